"""eventforge: message-driven task execution in one standard-library module.

Pub-sub and request-reply, in one process or across machines::

                    local (same process)     remote (over a Transport)
    pub-sub         MessageQueue             RemoteQueue
    request-reply   Executor                 RPCServer / RPCClient

The file reads top to bottom, the in-process story first and sockets after
it; every section builds on the sections above it (docs/internals.md has the
same map, with threads, lock order and debug hooks).

    1. errors ................ EventforgeError and its subclasses; _Counter
    2. topics ................ validate_topic, validate_pattern, topic_matches,
                               SubscriptionTrie (one matcher for every transport)
    3. messages and wire ..... Message, encode, decode, FrameDecoder
    4. transports ............ Transport (the ABC), Inbox, MemoryTransport;
                               what network transports share (_Loop, _Dispatcher)
    5. queues ................ MessageQueue
    6. execution ............. Executor, ExecutionMode, TaskStatus, TaskResult
    7. RPC ................... RPCServer, RPCClient, RoundRobinRPCClient, with_retry,
                               RPCRequest, RPCResponse, TaskRequest
    8. observers ............. TaskContext, SharedState, Eventful, Observable,
                               dispatchers, Node, Reporter, Meter and its kinds,
                               observe
    9. tasks ................. task, TaskRunner, TaskPool
   10. work queues ........... WorkQueue; WorkStore (the storage seam), Lease,
                               MemoryWorkStore, SQLiteWorkStore
   11. TCP ................... TCPServerTransport, TCPClientTransport (a shared
                               _TCPEndpoint base and small collaborators)
   12. remote queues ......... RemoteQueue (named peers over any Transport)
   13. monitor ............... Monitor (health, JSON, Prometheus metrics, a page)
   14. command line .......... worker (RPC, or a work queue's JOBS), call, pub,
                               sub, main(argv)
   15. demo .................. the demo and demo-queue commands (skip it)
   16. import aliases ........ the finder behind ``eventforge.transports.tcp`` & co.

The wire format is specified in ``docs/protocol.md``; what each transport
promises (ordering, delivery, what is kept or dropped) in
``docs/guarantees.md``.  MIT licensed (see
LICENSE); this file may be copied alone into a project.  Heavy standard-library
modules (``ssl``, ``asyncio``, ``multiprocessing`` ...) are imported where they
are first used, so ``import eventforge`` stays cheap.
"""

from __future__ import annotations

import abc
import collections
import enum
import functools
import itertools
import json
import logging
import os
import re
import sys
import threading
import time
import weakref
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Deque,
    Dict,
    Iterable,
    List,
    NamedTuple,
    Optional,
    Sequence,
    Tuple,
    Type,
    Union,
    cast,
)

if TYPE_CHECKING:  # real types for annotations, at no import cost
    import argparse
    import asyncio
    import concurrent.futures
    import http.server
    import multiprocessing.context
    import select
    import selectors
    import socket
    import sqlite3
    import ssl
    import subprocess
    import types
    from concurrent.futures import Future

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
    "QueueFullError",
    "ConnectionLostError",
    "AuthenticationError",
    "EventforgeTimeoutError",
    "RPCTimeoutError",
    "RemoteError",
    "MethodNotFoundError",
    "StoreError",
    "StoreBusyError",
    "StoreFullError",
    # topics
    "MAX_TOPIC_LENGTH",
    "validate_topic",
    "validate_pattern",
    "topic_matches",
    "is_pattern",
    "SubscriptionTrie",
    # messages and wire
    "DEFAULT_MAX_FRAME_SIZE",
    "Message",
    "new_id",
    "encode",
    "decode",
    "FrameDecoder",
    # transports
    "INBOX_PREFIXES",
    "DEFAULT_MAX_BUFFERED",
    "Transport",
    "Inbox",
    "MemoryTransport",
    # queues
    "TTL_HEADER",
    "MessageQueue",
    # execution
    "ExecutionMode",
    "TaskStatus",
    "TaskResult",
    "TaskNotFoundError",
    "Executor",
    # RPC
    "RPC_REPLY_PREFIX",
    "RPCServer",
    "RPCClient",
    "RemoteMethod",
    "RoundRobinRPCClient",
    "RetryingRPCClient",
    "with_retry",
    "DURATION_BUCKETS",
    "TaskRequest",
    "RPCRequest",
    "RPCResponse",
    # observers
    "ExecutionContext",
    "TaskContext",
    "SharedState",
    "Dispatcher",
    "BroadcastDispatcher",
    "RoundRobinDispatcher",
    "ConcurrentDispatcher",
    "LeastLoadedDispatcher",
    "Node",
    "Eventful",
    "Observable",
    "Reporter",
    "LoggingReporter",
    "Meter",
    "TimingMeter",
    "MemoryMeter",
    "CPUMeter",
    "MetricsMeter",
    "observe",
    # tasks
    "TaskPool",
    "TaskRunner",
    "task",
    # work queues
    "DEFAULT_CONSUMER_GROUP",
    "DEAD_LETTER_SUFFIX",
    "Lease",
    "WorkStore",
    "MemoryWorkStore",
    "SQLiteWorkStore",
    "WorkQueue",
    # TCP
    "PROTOCOL_VERSION",
    "DEFAULT_TCP_PORT",
    "TCPServerTransport",
    "TCPClientTransport",
    # remote
    "RemoteQueue",
    # monitor
    "DEFAULT_MONITOR_PORT",
    "MONITOR_TOKEN_ENV",
    "Monitor",
    # command line
    "load_worker_module",
    "load_job_module",
    "worker_main",
    "main",
]

logger = logging.getLogger("eventforge")
logger.addHandler(logging.NullHandler())


def _logging_configured() -> bool:
    """True if the application gave the ``eventforge`` logger somewhere to go:
    a handler of its own (other than our NullHandler) or on an ancestor it
    propagates to, the root logger included."""
    current: Optional[logging.Logger] = logger
    while current is not None:
        for handler in current.handlers:
            if not isinstance(handler, logging.NullHandler):
                return True
        if not current.propagate:
            return False
        current = current.parent
    return False


def _reraise_interrupt(exc: BaseException) -> None:
    """Re-raise Ctrl-C and ``sys.exit()`` on the main thread; anywhere else
    they (like every other exception from user code) fail only that call."""
    if isinstance(exc, (KeyboardInterrupt, SystemExit)) and (
        threading.current_thread() is threading.main_thread()
    ):
        raise exc


def _report_unhandled(summary: str, exc: BaseException) -> None:
    """Show an error nobody asked to handle, once, with its traceback.

    With logging configured by the application it is logged at ERROR on the
    ``eventforge`` logger; otherwise it is printed to stderr, as
    ``threading.excepthook`` and asyncio do, so it is never silently lost.
    """
    exc_info = (type(exc), exc, exc.__traceback__)
    if _logging_configured():
        logger.error("%s", summary, exc_info=exc_info)
        return
    stream = sys.stderr
    if stream is None:  # pythonw: nowhere to print
        return
    import traceback

    try:
        stream.write(f"eventforge: {summary}\n")
        traceback.print_exception(*exc_info, file=stream)
        stream.flush()
    except Exception:  # a broken stderr must not break delivery
        pass


class _Counter:
    """A counter any thread may add to; read with :attr:`value`.

    The one way this module counts events (messages sent, frames dropped,
    tasks run ...).  ``add(n)`` takes a lock; a path too hot for a lock adds
    one with ``next(counter.ticks)``: ``next()`` on an ``itertools.count`` is
    atomic under the GIL and cheaper than any call.  A read takes one tick
    itself and subtracts those of earlier reads (reads are serialised by the
    lock), so :attr:`value` stays exact.  Ids use a bare ``itertools.count``
    instead: they are taken, never read back.  When a counter is bumped
    inside a section already holding a lock, a plain ``int`` under that lock
    is fine too; what is never fine is an unlocked ``+=`` shared by threads,
    which loses updates.
    """

    __slots__ = ("_lock", "_value", "_reads", "ticks")

    def __init__(self, start: int = 0) -> None:
        self._lock = threading.Lock()
        self._value = start
        self._reads = 0
        #: ``next(counter.ticks)`` adds one, lock-free (ignore what it returns).
        self.ticks = itertools.count()

    def _ticked(self) -> int:
        # Called with self._lock held: the ticks so far, less those of reads.
        ticked = next(self.ticks) - self._reads
        self._reads += 1
        return ticked

    def add(self, amount: int = 1) -> int:
        """Add ``amount`` (default 1) and return the new total."""
        with self._lock:
            self._value += amount
            return self._value + self._ticked()

    @property
    def value(self) -> int:
        """The current total."""
        with self._lock:
            return self._value + self._ticked()

    def __repr__(self) -> str:
        return f"_Counter({self.value})"


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


class QueueFullError(EventforgeError):
    """A bounded work queue is full; the job was not accepted (backpressure)."""


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
    """The RPC server has no method registered under the requested name.

    ``str(error)`` is the server's message, ``"Method not found: NAME"``
    (the class name already says the rest).
    """

    def __str__(self) -> str:
        return self.remote_message or self.remote_type


class StoreError(EventforgeError):
    """A durable work store failed (the message names the file and the operation)."""


class StoreBusyError(StoreError, TimeoutError):
    """A durable work store stayed locked by another writer past its busy timeout."""


class StoreFullError(StoreError):
    """A durable work store cannot grow: its disk, or its size limit, is full."""


# ---------------------------------------------------------------------------
# 2. Topics
# ---------------------------------------------------------------------------

#: Longest accepted topic or pattern, in characters.  Generous for real
#: hierarchies, small enough that a hostile peer cannot make matching costly.
MAX_TOPIC_LENGTH = 1024

_SEGMENT_CHARS = r"[^\s\x00-\x1f\x7f-\x9f.*]+"
_TOPIC_RE = re.compile(rf"{_SEGMENT_CHARS}(?:\.{_SEGMENT_CHARS})*")
_PATTERN_SEGMENT_RE = re.compile(rf"{_SEGMENT_CHARS}|\*|\*\*")
_FORBIDDEN_CHAR_RE = re.compile(r"[\s\x00-\x1f\x7f-\x9f]")

#: Topics with these prefixes are request inboxes.  They are private to the
#: requester: no wildcard pattern matches them (as MQTT's ``#`` never matches
#: ``$`` topics), only an exact subscription does.  A message sent to one that
#: nobody awaits (a late reply after a timeout) is dropped and counted, never
#: buffered, so abandoned requests leave no state behind.
INBOX_PREFIXES = ("_reply.", "_rpc_reply.")

# User topics (never '$' ones) already validated: the publish path pays
# one dict lookup.  Cleared when full.
_VALID_TOPICS: Dict[str, bool] = {}
_VALID_TOPICS_MAX = 4096


def _describe_topic_problem(text: Any, kind: str, allow_wildcards: bool) -> str:
    """Explain why ``text`` is not a valid topic/pattern (for error messages)."""
    if not isinstance(text, str):
        return f"{kind} must be a str, not {type(text).__name__}"
    if not text:
        return f"{kind} must not be empty"
    if len(text) > MAX_TOPIC_LENGTH:
        return f"{kind} is {len(text)} characters long; the maximum is {MAX_TOPIC_LENGTH}"
    bad = _FORBIDDEN_CHAR_RE.search(text)
    if bad:
        return f"{kind} {text!r} contains whitespace or a control character ({bad.group()!r})"
    for segment in text.split("."):
        if not segment:
            return f"{kind} {text!r} has an empty segment (leading, trailing or doubled '.')"
        if "*" in segment:
            if not allow_wildcards:
                return (
                    f"{kind} {text!r} contains a wildcard; wildcards are only "
                    "allowed in subscription patterns"
                )
            if segment not in ("*", "**"):
                return (
                    f"{kind} {text!r} has a partial wildcard segment {segment!r}; "
                    "a wildcard must be a whole segment ('*' or '**')"
                )
    return f"{kind} {text!r} is invalid"


def validate_topic(topic: Any, *, allow_reserved: bool = False) -> str:
    """Return ``topic`` if it is a valid concrete topic, else raise TopicError.

    A topic is one or more non-empty segments joined by ``.``, without
    whitespace, control characters or wildcards, at most
    :data:`MAX_TOPIC_LENGTH` characters.  Topics starting with ``$`` are
    reserved for protocol control frames and refused unless
    ``allow_reserved`` is true.
    """
    if type(topic) is str:
        if topic in _VALID_TOPICS:
            return topic
        if len(topic) <= MAX_TOPIC_LENGTH and _TOPIC_RE.fullmatch(topic) is not None:
            if topic[0] != "$":
                if len(_VALID_TOPICS) >= _VALID_TOPICS_MAX:
                    _VALID_TOPICS.clear()
                _VALID_TOPICS[topic] = True
                return topic
            if allow_reserved:
                return topic
            raise TopicError(
                f"topic {topic!r} starts with '$', which is reserved for protocol use"
            )
    raise TopicError(_describe_topic_problem(topic, "topic", allow_wildcards=False))


def validate_pattern(pattern: Any, *, allow_reserved: bool = False) -> str:
    """Return ``pattern`` if it is a valid subscription pattern, else raise TopicError.

    A pattern is a topic whose segments may also be ``*`` (exactly one
    segment) or ``**`` (zero or more segments, in any position).
    """
    if (
        type(pattern) is str
        and 0 < len(pattern) <= MAX_TOPIC_LENGTH
        and all(_PATTERN_SEGMENT_RE.fullmatch(s) for s in pattern.split("."))
    ):
        if allow_reserved or pattern[0] != "$":
            return pattern
        raise TopicError(
            f"pattern {pattern!r} starts with '$', which is reserved for protocol use"
        )
    raise TopicError(_describe_topic_problem(pattern, "pattern", allow_wildcards=True))


def is_pattern(text: str) -> bool:
    """Return True if ``text`` contains a wildcard segment."""
    return "*" in text


def topic_matches(pattern: str, topic: str) -> bool:
    """Return True if the concrete ``topic`` matches the subscription ``pattern``.

    A pattern with a wildcard never matches an inbox topic (one starting
    with a prefix of :data:`INBOX_PREFIXES`): replies are private.
    """
    if "*" not in pattern:
        return pattern == topic
    if topic.startswith(INBOX_PREFIXES):
        return False
    return _segments_match(pattern.split("."), topic.split("."))


def _segments_match(pattern: List[str], topic: List[str]) -> bool:
    # Classic glob matching with backtracking only over the last '**'.
    p = t = 0
    star_p = star_t = -1
    while t < len(topic):
        if p < len(pattern) and pattern[p] == "**":
            star_p, star_t = p, t
            p += 1
        elif p < len(pattern) and (pattern[p] == "*" or pattern[p] == topic[t]):
            p += 1
            t += 1
        elif star_p >= 0:
            star_t += 1
            p, t = star_p + 1, star_t
        else:
            return False
    while p < len(pattern) and pattern[p] == "**":
        p += 1
    return p == len(pattern)


_MISSING = object()


class _TrieNode:
    __slots__ = ("children", "star", "globstar", "entries", "loops")

    def __init__(self, loops: bool = False) -> None:
        self.loops = loops  # reached through '**': may swallow any segment
        self.children: Dict[str, _TrieNode] = {}
        self.star: Optional[_TrieNode] = None
        self.globstar: Optional[_TrieNode] = None
        self.entries: Dict[Any, Tuple[int, Any]] = {}

    def is_empty(self) -> bool:
        return not (self.children or self.star or self.globstar or self.entries)


class SubscriptionTrie:
    """Thread-safe map from subscription patterns to values, matched by topic.

    Patterns live in a segment trie with separate children for ``*`` and
    ``**``; :meth:`match` walks it once per segment (an NFA simulation, so
    many ``**`` never backtrack exponentially) and a bounded cache maps
    recently published topics to their matches.  The cost of a publish
    therefore depends on the topic, not on the number of subscriptions.

    Values are returned in the order they were added.  Every transport,
    including the adapters in ``eventforge_ext``, uses this one matcher.
    Inbox topics (:data:`INBOX_PREFIXES`) match exact patterns only.

    The cache, ``_cache`` (topic -> matches), changes only under the lock
    and is replaced whenever an entry is added or removed, so a publish fast
    path (MemoryTransport.send) may look a topic up in it without the lock
    and fall back on :meth:`match`; nothing else outside this class reads
    it.  :meth:`debug_state` shows the trie's shape for tests.
    """

    def __init__(self, cache_size: int = 2048) -> None:
        self._root = _TrieNode()
        self._keys: Dict[Any, Tuple[str, int]] = {}
        self._lock = threading.Lock()
        self._seq = itertools.count()
        self._cache: Dict[str, Tuple[Any, ...]] = {}
        self._cache_size = cache_size

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: Any) -> bool:
        return key in self._keys

    def add(self, key: Any, pattern: str, value: Any) -> None:
        """Add ``value`` under ``pattern``, identified by the unique ``key``.

        The pattern must already be valid (see :func:`validate_pattern`).
        """
        with self._lock:
            if key in self._keys:
                raise KeyError(f"subscription key {key!r} is already in use")
            node = self._root
            for segment in pattern.split("."):
                if segment == "*":
                    if node.star is None:
                        node.star = _TrieNode()
                    node = node.star
                elif segment == "**":
                    if node.globstar is None:
                        node.globstar = _TrieNode(loops=True)
                    node = node.globstar
                else:
                    child = node.children.get(segment)
                    if child is None:
                        child = node.children[segment] = _TrieNode()
                    node = child
            seq = next(self._seq)
            node.entries[key] = (seq, value)
            self._keys[key] = (pattern, seq)
            self._cache = {}

    def remove(self, key: Any) -> bool:
        """Remove the value added under ``key``; return False if there was none."""
        return self.pop(key, _MISSING) is not _MISSING

    def pop(self, key: Any, default: Any = None) -> Any:
        """Remove the entry added under ``key`` and return its value (or ``default``)."""
        with self._lock:
            found = self._keys.pop(key, None)
            if found is None:
                return default
            path: List[Tuple[_TrieNode, str]] = []
            node = self._root
            for segment in found[0].split("."):
                path.append((node, segment))
                if segment == "*":
                    node = node.star  # type: ignore[assignment]
                elif segment == "**":
                    node = node.globstar  # type: ignore[assignment]
                else:
                    node = node.children[segment]
            value = node.entries.pop(key)[1]
            # Prune branches left empty so churn does not grow the trie.
            for parent, segment in reversed(path):
                if not node.is_empty():
                    break
                if segment == "*":
                    parent.star = None
                elif segment == "**":
                    parent.globstar = None
                else:
                    del parent.children[segment]
                node = parent
            self._cache = {}
            return value

    def clear(self) -> None:
        """Remove every entry."""
        with self._lock:
            self._root = _TrieNode()
            self._keys.clear()
            self._cache = {}

    def patterns(self) -> List[str]:
        """Return the patterns currently held (one per key, in insertion order)."""
        with self._lock:
            return [pattern for pattern, _ in self._keys.values()]

    def debug_state(self) -> Dict[str, Any]:
        """The trie's shape and cache, for tests and diagnostics only (not a stable API).

        ``nodes``: one pattern prefix per node besides the root, sorted (a
        trie holding just ``a.*`` gives ``["a", "a.*"]``; pruning leaves no
        empty branch behind); ``entries``: the values held over all nodes;
        ``cached``: the topics in the match cache, least recently added first;
        ``cache_size``: its bound.
        """
        with self._lock:
            nodes: List[str] = []
            entries = len(self._root.entries)
            stack: List[Tuple[str, _TrieNode]] = [("", self._root)]
            while stack:
                prefix, node = stack.pop()
                edges = list(node.children.items())
                if node.star is not None:
                    edges.append(("*", node.star))
                if node.globstar is not None:
                    edges.append(("**", node.globstar))
                for segment, child in edges:
                    path = f"{prefix}.{segment}" if prefix else segment
                    nodes.append(path)
                    entries += len(child.entries)
                    stack.append((path, child))
            return {
                "nodes": sorted(nodes),
                "entries": entries,
                "cached": list(self._cache),
                "cache_size": self._cache_size,
            }

    def match(self, topic: str) -> Tuple[Any, ...]:
        """Return the values whose pattern matches ``topic``, oldest first."""
        found = self._cache.get(topic)
        if found is not None:
            return found
        root = self._root
        if root.star is None and root.globstar is None:
            # Nothing can match a first segment the root has no child for:
            # one-off topics (reply inboxes, ids) skip the walk and the cache.
            first, _, _ = topic.partition(".")
            if first not in root.children:
                return ()
        with self._lock:
            found = self._match_locked(topic)
            cache = self._cache
            if len(cache) >= self._cache_size:
                if not cache:  # cache_size=0: no caching
                    return found
                del cache[next(iter(cache))]
            cache[topic] = found
            return found

    def _match_locked(self, topic: str) -> Tuple[Any, ...]:
        if topic.startswith(INBOX_PREFIXES):
            return self._match_exact(topic)
        states = self._closure([self._root])
        for segment in topic.split("."):
            step: List[_TrieNode] = []
            for node in states:
                if node.loops:
                    step.append(node)
                child = node.children.get(segment)
                if child is not None:
                    step.append(child)
                if node.star is not None:
                    step.append(node.star)
            if not step:
                return ()
            states = self._closure(step)
        hits: List[Tuple[int, Any]] = []
        for node in states:
            if node.entries:
                hits.extend(node.entries.values())
        if not hits:
            return ()
        hits.sort(key=_first)
        return tuple(value for _, value in hits)

    def _match_exact(self, topic: str) -> Tuple[Any, ...]:
        # Literal children only: no '*' or '**' edge is ever followed.
        node = self._root
        for segment in topic.split("."):
            child = node.children.get(segment)
            if child is None:
                return ()
            node = child
        hits = sorted(node.entries.values(), key=_first)
        return tuple(value for _, value in hits)

    @staticmethod
    def _closure(nodes: List[_TrieNode]) -> List[_TrieNode]:
        # Add the nodes reachable through '**' edges, which match zero
        # segments; deduplicate by identity so the state set stays small.
        seen: Dict[int, _TrieNode] = {}
        stack = list(nodes)
        while stack:
            node = stack.pop()
            if id(node) in seen:
                continue
            seen[id(node)] = node
            if node.globstar is not None:
                stack.append(node.globstar)
        return list(seen.values())


def _first(pair: Tuple[int, Any]) -> int:
    return pair[0]



# ---------------------------------------------------------------------------
# 3. Messages and the wire codec
# ---------------------------------------------------------------------------

#: Default upper bound of one frame's JSON body, in bytes (1 MiB).
DEFAULT_MAX_FRAME_SIZE = 1024 * 1024

_HEADER_SIZE = 4  # frame = 4-byte unsigned big-endian length + UTF-8 JSON body
_MAX_WIRE_LENGTH = 0xFFFFFFFF
_MESSAGE_FIELDS = ("id", "topic", "payload", "headers", "timestamp", "reply_to", "correlation_id")


def _id_prefix() -> str:
    # uuid4-shaped: 74 random bits fixed per process, then a 12-hex-digit
    # counter (wider past 2**48 messages, still unique).
    r = os.urandom(10).hex()
    return f"{r[:8]}-{r[8:12]}-4{r[12:15]}-{'89ab'[int(r[15], 16) % 4]}{r[16:19]}-"


_ids = itertools.count()
_id_template = _id_prefix() + "%012x"


def _reset_ids_after_fork() -> None:
    global _ids, _id_template
    _ids = itertools.count()
    _id_template = _id_prefix() + "%012x"


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_ids_after_fork)


def new_id() -> str:
    """Return a new unique message id shaped like a UUID4 string.

    Unique across processes (a random per-process prefix) and far cheaper
    than ``str(uuid.uuid4())``: one counter step and a string format.
    """
    return _id_template % next(_ids)


# Field ranges are checked here; only days 29-31 need a calendar (see decode).
_ISO_RE = re.compile(
    r"(?!0000)(\d{4})-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])[T ]([01]\d|2[0-3]):([0-5]\d)"
    r"(?::([0-5]\d)(?:[.,](\d{1,9}))?)?"
    r"(Z|z|[+-](?:[01]\d|2[0-3])(?::?[0-5]\d)?)?"
)


_MIN_EPOCH = -62135596800  # 0001-01-01T00:00:00Z
_MAX_EPOCH = 253402300800  # 10000-01-01T00:00:00Z, excluded
_LAST_EPOCH_FLOAT = 253402300799.99997  # the largest float below it, near enough


def _parse_timestamp(value: Any) -> float:
    """Turn a wire timestamp (ISO 8601 string or epoch seconds) into epoch seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        # Years 1-9999 (what datetime can hold); also refuses NaN and infinities.
        if not _MIN_EPOCH <= value < _MAX_EPOCH:
            raise FrameError(f"timestamp {value!r} is not epoch seconds in the years 1-9999")
        return float(value)
    if isinstance(value, str):
        m = _ISO_RE.fullmatch(value)
        if m is not None:
            import calendar

            year, month, day, hour, minute = (int(g) for g in m.groups()[:5])
            second = int(m.group(6) or 0)
            fraction = float("0." + m.group(7)) if m.group(7) else 0.0
            zone = m.group(8)
            offset = 0
            if zone and zone not in ("Z", "z"):
                digits = zone[1:].replace(":", "")
                offset = int(digits[:2]) * 3600 + int(digits[2:4] or 0) * 60
                if zone[0] == "-":
                    offset = -offset
            try:
                base = calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0))
                # timegm is lenient; round-tripping catches 2024-02-31 and friends.
                if time.gmtime(base)[:6] != (year, month, day, hour, minute, second):
                    raise ValueError
            except (ValueError, OverflowError):
                raise FrameError(f"timestamp {value!r} is not a valid date and time") from None
            whole = base - offset
            # An offset can push 0001-01-01 or 9999-12-31 out of what a datetime holds.
            if not _MIN_EPOCH <= whole < _MAX_EPOCH:
                raise FrameError(f"timestamp {value!r} is outside the years 1-9999 in UTC")
            # Near year 9999 a float rounds the last microseconds up to 10000.
            return min(whole + fraction, _LAST_EPOCH_FLOAT)
    raise FrameError(
        f"timestamp must be an ISO 8601 string or epoch seconds, not {value!r:.80}"
    )


_ts_prefix: Tuple[int, str] = (0, "1970-01-01T00:00:00")  # the last second formatted


def _format_timestamp(epoch: float) -> str:
    """Format epoch seconds as ISO 8601 UTC with a ``Z`` suffix (microseconds)."""
    global _ts_prefix
    micros = round(epoch * 1_000_000)  # an int
    seconds = micros // 1_000_000
    micro = micros - seconds * 1_000_000  # divmod's pair, without building a tuple
    cached = _ts_prefix  # one tuple read: safe against a concurrent update
    if cached[0] == seconds:
        text = cached[1]
    else:
        # Not strftime: its %Y gives "1", not "0001", for small years on glibc.
        text = "{:04d}-{:02d}-{:02d}T{:02d}:{:02d}:{:02d}".format(*time.gmtime(seconds)[:6])
        _ts_prefix = (seconds, text)
    return f"{text}.{micro:06d}Z" if micro else text + "Z"


def _datetime_to_epoch(value: Any) -> float:
    if value.tzinfo is None:  # naive datetimes are taken as UTC
        import datetime as _dt

        value = value.replace(tzinfo=_dt.timezone.utc)
    return float(value.timestamp())


class Message:
    """One message: a topic, a JSON-able payload and routing metadata.

    ``id`` and ``timestamp`` are filled in when omitted.  ``reply_to`` names
    the topic a reply should go to; ``correlation_id`` ties a reply to its
    request.  The timestamp is kept as epoch seconds (or the wire string it
    arrived as) and only turned into an aware UTC ``datetime`` when read.

    For code written against eventforge 0.1 (pydantic-based), ``model_dump``,
    ``model_dump_json``, ``model_validate``, ``model_validate_json`` and
    ``model_copy`` behave like their pydantic namesakes.

    Every Message gets its fields from :func:`_init_message` (the module's
    own builders skip this constructor's keyword parsing).
    """

    __slots__ = ("id", "topic", "payload", "headers", "_ts", "reply_to", "correlation_id")

    id: str
    topic: str
    payload: Any
    headers: Dict[str, Any]
    _ts: Any  # epoch seconds, the wire string it arrived as, or a datetime
    reply_to: Optional[str]
    correlation_id: Optional[str]

    def __init__(
        self,
        topic: str,
        payload: Any = None,
        *,
        id: Optional[str] = None,  # noqa: A002 - the wire field is called "id"
        headers: Optional[Dict[str, Any]] = None,
        timestamp: Any = None,
        reply_to: Optional[str] = None,
        correlation_id: Optional[str] = None,
    ) -> None:
        _init_message(
            self,
            id if id is not None else _id_template % next(_ids),
            topic,
            payload,
            headers if headers is not None else {},
            time.time() if timestamp is None else timestamp,
            reply_to,
            correlation_id,
        )

    @property
    def timestamp(self) -> Any:
        """When the message was created, as an aware UTC ``datetime``."""
        ts = self._ts
        if type(ts) is not float:
            if hasattr(ts, "tzinfo"):
                if ts.tzinfo is not None:
                    return ts
                ts = _datetime_to_epoch(ts)
            else:
                ts = _parse_timestamp(ts)
        import datetime as _dt

        value = _dt.datetime.fromtimestamp(ts, _dt.timezone.utc)
        self._ts = value
        return value

    @timestamp.setter
    def timestamp(self, value: Any) -> None:
        self._ts = value

    def _wire_timestamp(self) -> str:
        ts = self._ts
        if type(ts) is str:
            return ts
        if type(ts) is float or type(ts) is int:
            return _format_timestamp(ts)
        if hasattr(ts, "tzinfo"):
            return _format_timestamp(_datetime_to_epoch(ts))
        return _format_timestamp(_parse_timestamp(ts))

    # -- pydantic-style helpers -------------------------------------------------

    def model_dump(self, *, mode: str = "python") -> Dict[str, Any]:
        """Return the fields as a dict (``mode="json"`` gives the wire form)."""
        if mode == "json":
            return self._wire_dict()
        return {
            "id": self.id,
            "topic": self.topic,
            "payload": self.payload,
            "headers": self.headers,
            "timestamp": self.timestamp,
            "reply_to": self.reply_to,
            "correlation_id": self.correlation_id,
        }

    def model_dump_json(self) -> str:
        """Return the JSON text of the wire form (the frame body)."""
        return _wire_json(self)

    @classmethod
    def model_validate(cls, obj: Any) -> Message:
        """Build a Message from a dict of fields (or return a Message as is)."""
        if isinstance(obj, Message):
            return obj
        return _message_from_dict(obj)

    @classmethod
    def model_validate_json(cls, data: Any) -> Message:
        """Build a Message from the JSON text (str or bytes) of its wire form."""
        if isinstance(data, str):
            data = data.encode("utf-8")
        return decode(data)

    def model_copy(self, *, update: Optional[Dict[str, Any]] = None, deep: bool = False) -> Message:
        """Return a copy, with the fields in ``update`` replaced."""
        fields = {
            "id": self.id,
            "topic": self.topic,
            "payload": self.payload,
            "headers": dict(self.headers),
            "timestamp": self._ts,
            "reply_to": self.reply_to,
            "correlation_id": self.correlation_id,
        }
        if deep:
            import copy

            fields = copy.deepcopy(fields)
        if update:
            unknown = set(update) - set(_MESSAGE_FIELDS)
            if unknown:
                raise ValueError(f"unknown Message field(s): {', '.join(sorted(unknown))}")
            fields.update(update)
        topic = fields.pop("topic")
        payload = fields.pop("payload")
        return Message(topic, payload, **fields)

    def _wire_dict(self) -> Dict[str, Any]:
        return {
            "id": self.id,
            "topic": self.topic,
            "payload": self.payload,
            "headers": self.headers,
            "timestamp": self._wire_timestamp(),
            "reply_to": self.reply_to,
            "correlation_id": self.correlation_id,
        }

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Message):
            return NotImplemented
        return self._wire_dict() == other._wire_dict()

    __hash__ = None  # type: ignore[assignment]  # mutable, as in eventforge 0.1

    def __repr__(self) -> str:
        extra = ""
        if self.reply_to is not None:
            extra += f", reply_to={self.reply_to!r}"
        if self.correlation_id is not None:
            extra += f", correlation_id={self.correlation_id!r}"
        payload = f"{self.payload!r:.200}"  # long payloads are cut in the repr
        return f"Message(topic={self.topic!r}, payload={payload}, id={self.id!r}{extra})"


_new_object = object.__new__
_now = time.time


def _init_message(
    message: Message,
    id: str,  # noqa: A002 - the wire field is called "id"
    topic: str,
    payload: Any,
    headers: Dict[str, Any],
    ts: Any,
    reply_to: Optional[str],
    correlation_id: Optional[str],
) -> Message:
    """Set every field of ``message`` and return it: the one constructor path.

    ``Message.__init__`` comes here with its defaults filled in; the module's
    own builders with ``_new_object(Message)`` and fields already checked.
    """
    message.id = id
    message.topic = topic
    message.payload = payload
    message.headers = headers
    message._ts = ts
    message.reply_to = reply_to
    message.correlation_id = correlation_id
    return message


def _message_epoch(message: Message) -> float:
    """When ``message`` was created, in epoch seconds (without building a datetime)."""
    ts = message._ts
    if type(ts) is float or type(ts) is int:
        return float(ts)
    if hasattr(ts, "tzinfo"):
        return _datetime_to_epoch(ts)
    return _parse_timestamp(ts)


def _make_message(
    topic: str,
    payload: Any,
    headers: Dict[str, Any],
    reply_to: Optional[str] = None,
    correlation_id: Optional[str] = None,
) -> Message:
    """A new Message with a fresh id and timestamp, without ``Message.__init__``'s
    keyword parsing (the publish path is dominated by message construction).
    """
    return _init_message(_new_object(Message), _id_template % next(_ids), topic, payload,
                         headers, _now(), reply_to, correlation_id)


def _json_default(obj: Any) -> Any:
    """Convert the well-known non-JSON types; refuse everything else."""
    if isinstance(obj, (set, frozenset)):
        return list(obj)
    modules = sys.modules
    # A type can only occur if its module was imported: no import cost here.
    datetime_mod = modules.get("datetime")
    if datetime_mod is not None and isinstance(
        obj, (datetime_mod.datetime, datetime_mod.date, datetime_mod.time)
    ):
        return obj.isoformat()
    uuid_mod = modules.get("uuid")
    if uuid_mod is not None and isinstance(obj, uuid_mod.UUID):
        return str(obj)
    decimal_mod = modules.get("decimal")
    if decimal_mod is not None and isinstance(obj, decimal_mod.Decimal):
        if not obj.is_finite():
            raise SerializationError(f"Decimal {obj} is not finite; JSON has no NaN/Infinity")
        return str(obj)
    enum_mod = modules.get("enum")
    if enum_mod is not None and isinstance(obj, enum_mod.Enum):
        return obj.value
    if hasattr(type(obj), "__dataclass_fields__"):
        import dataclasses

        return dataclasses.asdict(obj)
    dump = getattr(obj, "model_dump", None)
    if callable(dump):
        try:
            return dump(mode="json")
        except TypeError:
            return dump()
    raise SerializationError(
        f"payload value of type {type(obj).__name__} is not JSON serializable "
        "(use str, int, float, bool, None, list, dict or a supported conversion)"
    )


_encoder = json.JSONEncoder(
    ensure_ascii=False, allow_nan=False, separators=(",", ":"), default=_json_default
)
_json_str = json.encoder.encode_basestring  # what _encoder uses for strings (C when available)
_c_make_encoder: Any = getattr(json.encoder, "c_make_encoder", None)  # None without _json


def _c_encode(obj: Any) -> str:
    # _encoder.encode(obj) minus its two Python layers: the C encoder it builds,
    # with the same arguments, called directly (a fresh markers dict each call).
    return "".join(_c_make_encoder(
        {}, _json_default, _json_str, None, ":", ",", False, False, False)(obj, 0))


try:  # only if this Python builds its C encoder the way _c_encode does
    _encode_json = _c_encode if _c_encode([{}, 2.5, "\u00e9\""]) == _encoder.encode(
        [{}, 2.5, "\u00e9\""]) else _encoder.encode
except Exception:  # pragma: no cover - no C accelerator, or another signature
    _encode_json = _encoder.encode


def _json_failure(exc: BaseException) -> SerializationError:
    """The SerializationError for what the JSON encoder raised."""
    if isinstance(exc, RecursionError):
        return SerializationError("payload is nested too deeply to encode")
    if isinstance(exc, ValueError):  # NaN / Infinity, circular references, huge ints
        if _is_int_digits_error(exc):
            return SerializationError(f"payload has {_int_limit_text()}")
        return SerializationError(f"payload is not valid JSON: {exc}")
    return SerializationError(f"payload is not JSON serializable: {exc}")  # e.g. tuple keys


def _dumps(obj: Any) -> str:
    try:
        return _encode_json(obj)
    except SerializationError:
        raise
    except (ValueError, RecursionError, TypeError) as exc:
        raise _json_failure(exc) from None


def _json_field(value: Any) -> str:
    if type(value) is str:
        return _json_str(value)
    return "null" if value is None else _encode_json(value)


_WIRE_TEMPLATE = ('{"id":%s,"topic":%s,"payload":%s,"headers":%s,"timestamp":%s,'
                  '"reply_to":%s,"correlation_id":%s}')


def _wire_text(message: Message, timestamp: str) -> str:
    # The JSON of message._wire_dict(), the same text down to the byte, without
    # building the dict: only the payload and non-empty headers need the encoder.
    headers = message.headers
    return _WIRE_TEMPLATE % (
        _json_field(message.id),
        _json_field(message.topic),
        _encode_json(message.payload),
        "{}" if type(headers) is dict and not headers else _encode_json(headers),
        _json_str(timestamp),
        _json_field(message.reply_to),
        _json_field(message.correlation_id),
    )


def _wire_json(message: Message) -> str:
    """The frame body of ``message`` as text: ``_dumps(message._wire_dict())``, faster."""
    timestamp = message._wire_timestamp()  # its FrameError stays a FrameError
    try:
        return _wire_text(message, timestamp)
    except SerializationError:
        raise
    except (ValueError, RecursionError, TypeError) as exc:
        raise _json_failure(exc) from None


def encode(message: Message, *, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> bytes:
    """Encode ``message`` as one wire frame: 4-byte big-endian length + JSON.

    Raises SerializationError (a TypeError) for values JSON cannot carry and
    FrameTooLargeError (a ValueError) if the body exceeds ``max_frame_size``.
    """
    try:
        body = _wire_json(message).encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate has no UTF-8 form
        raise SerializationError(f"message is not valid UTF-8 text: {exc}") from None
    size = len(body)
    if size > max_frame_size:
        raise FrameTooLargeError(
            f"message on {message.topic!r} encodes to {size} bytes; "
            f"max_frame_size is {max_frame_size}"
        )
    return size.to_bytes(4, "big") + body


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


_decoder = json.JSONDecoder(parse_constant=_reject_constant)
_scan_once = _decoder.scan_once  # type: ignore[attr-defined]  # raw_decode() minus a frame


def decode(body: Any) -> Message:
    """Decode one frame *body* (bytes-like, without its length prefix) into a Message.

    Raises FrameError (a ValueError) naming the problem: invalid UTF-8,
    invalid JSON, a value that is not an object, or a missing/invalid field.
    Unknown keys are ignored; a missing ``id`` or ``timestamp`` is generated.
    """
    try:
        text = str(body, "utf-8")
    except UnicodeDecodeError as exc:
        raise FrameError(f"frame is not valid UTF-8: {exc.reason} at byte {exc.start}") from None
    try:
        try:
            obj, end = _scan_once(text, 0)  # the common case, without the whitespace scans
        except (ValueError, StopIteration):
            end = -1  # leading whitespace or invalid: the full decoder says which
        if end != len(text):
            obj = _decoder.decode(text)
    except RecursionError:
        raise FrameError("frame JSON is nested too deeply") from None
    except ValueError as exc:
        if _is_int_digits_error(exc):
            raise FrameError(f"frame has {_int_limit_text()}") from None
        raise FrameError(f"frame is not valid JSON: {exc}") from None
    return _message_from_dict(obj)


def _is_int_digits_error(exc: ValueError) -> bool:
    # Python 3.11+ (and security releases of 3.9/3.10) refuse to convert
    # integers of more than sys.get_int_max_str_digits() decimal digits.
    return "integer string conversion" in str(exc)


def _int_limit_text() -> str:
    limit = getattr(sys, "get_int_max_str_digits", lambda: 0)()
    return (
        f"an integer of more than {limit} decimal digits, the limit of this Python "
        "(sys.set_int_max_str_digits); send larger numbers as strings"
    )


def _not_optional_str(key: str, value: Any) -> FrameError:
    return FrameError(f"frame field {key!r} must be a string or null, not {type(value).__name__}")


def _is_datetime(value: Any) -> bool:
    datetime_mod = sys.modules.get("datetime")
    return datetime_mod is not None and isinstance(value, datetime_mod.datetime)


# "YYYY-MM-DDTHH:MM:SS" of the last wire timestamp found valid with a zero UTC
# offset: that second + ".ffffff" + "Z" (or + "Z") needs no regex, whose match
# and date check would be the same.  Racing threads only miss the shortcut.
_valid_second = "\0"


def _check_wire_timestamp(ts: str) -> None:
    """Raise FrameError unless ``ts`` is an ISO 8601 timestamp decode() accepts."""
    global _valid_second
    if ts[:19] == _valid_second and (
        ts[19:] == "Z" or (len(ts) == 27 and ts[19] == "." and ts[26] == "Z"
                           and ts[20:26].isdecimal())  # isdecimal() is what \d matches
    ):
        return
    match = _ISO_RE.fullmatch(ts)
    if match is None:
        raise FrameError(f"frame timestamp {ts!r:.80} is not ISO 8601")
    # Days 29-31 need a calendar (2023-02-29), and an offset can push the
    # first or last year out of range: check those now, not when read.
    if match.group(3) > "28" or match.group(1) in ("0001", "9999"):
        _parse_timestamp(ts)
    if match.group(6) is not None and match.group(8) in (None, "Z", "z"):
        _valid_second = ts[:19]


def _message_from_dict(obj: Any) -> Message:
    if type(obj) is not dict:
        raise FrameError(f"frame must be a JSON object, not {type(obj).__name__}")
    get = obj.get
    topic = get("topic")
    if topic is None:
        raise FrameError("frame has no 'topic'")
    if type(topic) is not str or topic not in _VALID_TOPICS:
        try:
            validate_topic(topic, allow_reserved=True)
        except TopicError as exc:
            raise FrameError(f"frame has an invalid topic: {exc}") from None
    headers = get("headers")
    if headers is None:
        headers = {}
    elif type(headers) is not dict:
        raise FrameError(f"frame field 'headers' must be an object, not {type(headers).__name__}")
    ts = get("timestamp")
    if ts is None:
        ts = _now()
    elif type(ts) is str:
        _check_wire_timestamp(ts)
    elif not _is_datetime(ts):  # model_validate() may pass a datetime through
        ts = _parse_timestamp(ts)
    message_id = get("id")
    if message_id is None:
        message_id = _id_template % next(_ids)
    elif type(message_id) is not str:
        raise _not_optional_str("id", message_id)
    reply_to = get("reply_to")
    if reply_to is not None and type(reply_to) is not str:
        raise _not_optional_str("reply_to", reply_to)
    correlation_id = get("correlation_id")
    if correlation_id is not None and type(correlation_id) is not str:
        raise _not_optional_str("correlation_id", correlation_id)
    return _init_message(_new_object(Message), message_id, topic, get("payload"), headers, ts,
                         reply_to, correlation_id)


class FrameDecoder:
    """Incremental frame splitter: feed it byte chunks, get whole frame bodies.

    A length prefix above ``max_frame_size`` raises FrameTooLargeError as soon
    as the 4 header bytes are seen, before any body byte is buffered, so a
    hostile length never sizes an allocation.  After that error the stream
    is out of sync and the connection must be closed; the error's ``frames``
    attribute holds the bodies of whole frames that preceded the bad header
    in the same :meth:`feed` call, so they need not be lost.
    """

    __slots__ = ("max_frame_size", "_buffer")

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        self.max_frame_size = max_frame_size
        self._buffer = bytearray()

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as a frame."""
        return len(self._buffer)

    def feed(self, data: bytes) -> List[bytes]:
        """Add ``data``; return the bodies of all frames now complete, in order."""
        buffer = self._buffer
        if buffer or type(data) is not bytes:
            buffer += data
            chunk: Any = buffer
        else:
            chunk = data  # nothing held back: slice the frames out of ``data`` itself
        frames: List[bytes] = []
        pos = 0
        end = len(chunk)
        limit = self.max_frame_size
        while end - pos >= _HEADER_SIZE:
            size = int.from_bytes(chunk[pos : pos + _HEADER_SIZE], "big")
            if size > limit:
                buffer.clear()
                error = FrameTooLargeError(
                    f"frame length {size} exceeds max_frame_size {limit}"
                )
                error.frames = frames  # type: ignore[attr-defined]
                raise error
            start = pos + _HEADER_SIZE
            if end - start < size:
                break
            pos = start + size
            frames.append(chunk[start:pos] if chunk is data else bytes(chunk[start:pos]))
        if chunk is data:
            if pos < end:
                buffer += data[pos:]
        elif pos:
            del buffer[:pos]
        return frames


# ---------------------------------------------------------------------------
# 4. Transports: the ABC and the in-memory transport
# ---------------------------------------------------------------------------

#: Default cap on unclaimed messages a MemoryTransport keeps over all topics.
DEFAULT_MAX_BUFFERED = 10_000


def _resolve_future(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class _Waiter:
    """One blocked consumer, woken with a message (or None when closed).

    Arming and fulfilling happen under the owner's lock; the message itself
    travels in ``message``, so a waiter that gives up after being fulfilled
    can still find (and return or requeue) it: nothing is lost.
    """

    __slots__ = ("message", "done", "_lock", "_future", "_loop")

    def __init__(self) -> None:
        self.message: Optional[Message] = None
        self.done = False
        self._lock: Optional[threading.Lock] = None
        self._future: Optional[asyncio.Future[None]] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None

    def arm_sync(self) -> _Waiter:
        lock = self._lock = threading.Lock()
        lock.acquire()
        return self

    def arm_async(self, loop: asyncio.AbstractEventLoop) -> _Waiter:
        self._loop = loop
        self._future = loop.create_future()
        return self

    def fulfil(self, message: Optional[Message]) -> None:
        self.message = message
        self.done = True
        if self._lock is not None:
            self._lock.release()
        elif self._future is not None and self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(_resolve_future, self._future)
            except RuntimeError:  # its event loop is closed; nobody is waiting
                pass


def _settle(
    waiter: _Waiter, owner_lock: threading.Lock, abandon: Callable[[], None]
) -> bool:
    """After a wait ended early: True if the waiter was fulfilled after all,
    else withdraw it (under the owner's lock, so no delivery races us)."""
    with owner_lock:
        if waiter.done:
            return True
        abandon()
        return False


def _wait_sync(
    waiter: _Waiter,
    owner_lock: threading.Lock,
    timeout: Optional[float],
    abandon: Callable[[], None],
) -> Optional[Message]:
    """Block until ``waiter`` is fulfilled or ``timeout`` passes."""
    if waiter.done:
        return waiter.message
    assert waiter._lock is not None
    if timeout is None:
        waiter._lock.acquire()
    elif timeout > 0:
        waiter._lock.acquire(timeout=timeout)
    if waiter.done or _settle(waiter, owner_lock, abandon):
        return waiter.message
    return None


async def _wait_async(
    waiter: _Waiter,
    owner_lock: threading.Lock,
    timeout: Optional[float],
    abandon: Callable[[], None],
    requeue: Callable[[Message], None],
) -> Optional[Message]:
    """Await ``waiter``; on cancellation a message already handed over is requeued."""
    import asyncio

    if waiter.done:
        return waiter.message
    loop, future = waiter._loop, waiter._future
    assert loop is not None and future is not None  # armed by arm_async
    # A timer resolves the future at the deadline.  Not asyncio.wait_for:
    # before Python 3.12 it swallows a cancellation that races a hand-over.
    timer = None
    if timeout is not None:
        timer = loop.call_later(max(timeout, 0), _resolve_future, future)
    try:
        await future
    except asyncio.CancelledError:
        if _settle(waiter, owner_lock, abandon) and waiter.message is not None:
            requeue(waiter.message)
        raise
    finally:
        if timer is not None:
            timer.cancel()
    if _settle(waiter, owner_lock, abandon):
        return waiter.message
    return None  # the deadline passed


class Inbox:
    """Messages on one exact topic, registered *before* a request is sent.

    A request opens an inbox on its reply topic, sends, then waits with
    :meth:`get` or :meth:`get_async`; a reply that arrives before the wait
    starts is kept.  Close it (or use ``with``) to withdraw the interest.
    At most ``maxsize`` messages are held; extra ones are dropped, counted
    in :attr:`dropped` and logged once.

    A transport built on MemoryTransport may open a subclass of it (see
    ``MemoryTransport._open_inbox``); such a subclass may override
    ``_register`` and use ``_lock``, ``_messages``, ``_waiters`` and
    ``_closed``, which nothing else outside this class touches.
    """

    def __init__(
        self,
        topic: str,
        *,
        on_close: Optional[Callable[[Inbox], None]] = None,
        maxsize: int = 1000,
    ) -> None:
        self.topic = topic
        self.maxsize = maxsize
        self._lock = threading.Lock()
        self._messages: Deque[Message] = collections.deque()
        self._waiters: Deque[_Waiter] = collections.deque()
        self._on_close = on_close
        self._closed = False
        self.dropped = 0

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called (or the transport closed)."""
        return self._closed

    def put(self, message: Message) -> None:
        """Deliver ``message`` to the oldest waiting getter, or keep it."""
        with self._lock:
            if self._closed:
                return
            if self._waiters:
                self._waiters.popleft().fulfil(message)
            elif len(self._messages) < self.maxsize:
                self._messages.append(message)
            else:
                self.dropped += 1
                if self.dropped == 1:  # once per inbox, never a line per message
                    logger.warning("inbox %r holds maxsize=%d messages; dropping newer ones "
                                   "(counted in .dropped)", self.topic, self.maxsize)

    def _requeue(self, message: Message) -> None:
        with self._lock:
            if self._closed:
                return
            if self._waiters:
                self._waiters.popleft().fulfil(message)
            else:
                self._messages.appendleft(message)

    def _register(self, timeout: Optional[float]) -> Tuple[Optional[Message], Optional[_Waiter]]:
        # Called with self._lock held.
        if self._messages:
            return self._messages.popleft(), None
        if self._closed or (timeout is not None and timeout <= 0):
            return None, None
        waiter = _Waiter()
        self._waiters.append(waiter)
        return None, waiter

    def _abandon(self, waiter: _Waiter) -> Callable[[], None]:
        return lambda: self._waiters.remove(waiter)

    def get(self, timeout: Optional[float] = None) -> Optional[Message]:
        """Return the next message, or None after ``timeout`` seconds or on close."""
        with self._lock:
            message, waiter = self._register(timeout)
            if waiter is None:
                return message
            waiter.arm_sync()
        return _wait_sync(waiter, self._lock, timeout, self._abandon(waiter))

    async def get_async(self, timeout: Optional[float] = None) -> Optional[Message]:
        """Await the next message, or None after ``timeout`` seconds or on close.

        If the awaiting task is cancelled after a message was handed to it,
        the message goes back to the front of the inbox.
        """
        import asyncio

        loop = asyncio.get_running_loop()
        with self._lock:
            message, waiter = self._register(timeout)
            if waiter is None:
                return message
            waiter.arm_async(loop)
        return await _wait_async(
            waiter, self._lock, timeout, self._abandon(waiter), self._requeue
        )

    def close(self) -> None:
        """Withdraw the interest; blocked getters return None."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            waiters, self._waiters = self._waiters, collections.deque()
            self._messages.clear()
        for waiter in waiters:
            waiter.fulfil(None)
        if self._on_close is not None:
            self._on_close(self)

    def __enter__(self) -> Inbox:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._messages)} waiting"
        return f"<Inbox {self.topic!r} {state}>"


class Transport(abc.ABC):
    """The wire under a MessageQueue: six methods, interchangeable implementations.

    ``send`` delivers a Message to every subscription whose pattern matches
    its topic (or, if none and nobody is receiving, keeps it for a later
    ``receive``, as the transport's delivery model says); ``receive`` takes
    one message from an exact topic; ``subscribe`` registers a callback for
    a pattern and returns an id for ``unsubscribe``.
    """

    @abc.abstractmethod
    def send(self, message: Message) -> None:
        """Deliver ``message``; raise TransportClosedError after close()."""

    @abc.abstractmethod
    def receive(self, topic: str, timeout: Optional[float] = None) -> Optional[Message]:
        """Take the next message on the exact ``topic``; None on timeout or close."""

    @abc.abstractmethod
    async def receive_async(
        self, topic: str, timeout: Optional[float] = None
    ) -> Optional[Message]:
        """Asyncio-native :meth:`receive`."""

    @abc.abstractmethod
    def subscribe(self, topic: str, callback: Callable[[Message], Any]) -> str:
        """Call ``callback(message)`` for every message matching the pattern ``topic``."""

    @abc.abstractmethod
    def unsubscribe(self, subscription_id: str) -> bool:
        """Remove a subscription; return False if the id is unknown."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release resources; blocked receivers return None, later sends raise."""

    def subscribe_handler(
        self,
        topic: str,
        handler: Callable[[Message], Any],
        on_error: Callable[[Any, Message, BaseException], Any],
    ) -> str:
        """Subscribe ``handler``; its exceptions go to ``on_error(handler, message, exc)``.

        MessageQueue subscribes through this.  The default wraps ``handler``;
        transports may store ``on_error`` beside the subscription instead and
        save a call per delivery.
        """

        def deliver(message: Message) -> None:
            try:
                handler(message)
            except BaseException as exc:  # any failure is that call's only
                on_error(handler, message, exc)

        return self.subscribe(topic, deliver)

    def open_inbox(self, topic: str) -> Inbox:
        """Register interest in the exact ``topic`` now and return its Inbox.

        Request-reply uses this so a reply that arrives before the requester
        starts waiting is not lost.  This default subscribes a callback;
        transports override it with something cheaper.
        """
        validate_topic(topic)
        holder: Dict[str, str] = {}

        def withdraw(_inbox: Inbox) -> None:
            self.unsubscribe(holder["id"])

        inbox = Inbox(topic, on_close=withdraw)
        holder["id"] = self.subscribe(topic, inbox.put)
        return inbox

    @property
    def stats(self) -> Dict[str, int]:
        """Counters of what the transport did (sent, delivered, errors ...)."""
        return {}

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


#: A callback carrying this attribute (set to True) still gets the messages
#: matched for it before it was unsubscribed, e.g. requests a TCP server had
#: read but not yet dispatched: RPCServer.stop() answers what it received.
_FINISH_QUEUED = "_eventforge_finish_queued"


class _Subscription:
    __slots__ = ("id", "pattern", "callback", "on_error", "active", "finish_queued")

    def __init__(
        self,
        sub_id: str,
        pattern: str,
        callback: Callable[[Message], Any],
        on_error: Optional[Callable[[Any, Message, BaseException], Any]] = None,
    ) -> None:
        self.id = sub_id
        self.pattern = pattern
        self.callback = callback
        self.on_error = on_error
        self.active = True
        self.finish_queued = getattr(callback, _FINISH_QUEUED, False) is True


def _callable_name(func: Any) -> str:
    return getattr(func, "__qualname__", None) or repr(func)


def _refuse_receive_pattern(topic: str) -> None:
    if isinstance(topic, str) and "*" in topic:
        raise TopicError(
            f"receive() takes an exact topic, not the pattern {topic!r}; "
            "use subscribe() to consume a pattern"
        )


class MemoryTransport(Transport):
    """In-process transport: synchronous delivery, no serialization, thread-safe.

    ``send`` runs the matching subscribers in the sender's thread, in
    subscription order, with no lock held (a handler may publish, subscribe,
    unsubscribe or wait for another thread that publishes).  A handler's
    exception is logged and counted and never reaches the sender.

    A message nobody subscribed to or is receiving waits in its topic's
    mailbox for a later :meth:`receive`: a bounded retention buffer of at
    most ``max_queue_size`` messages per topic and ``max_buffered`` over all
    topics.  Past either bound the *oldest* unclaimed message is dropped,
    counted in :attr:`stats` and logged (at most once per topic per
    ``drop_log_interval`` seconds), so ``send`` never fails for lack of a
    subscriber.  Emptied mailboxes are removed, and messages to inbox topics
    nobody awaits are dropped at once, so one-off topics leave nothing behind.

    Locks, outermost first: ``_lock`` (mailboxes, receivers, inboxes, drop
    counts), then an :class:`Inbox`'s lock (a message is put into it under
    ``_lock``) or the ``sent`` counter's.  The subscription trie's lock is
    never taken with ``_lock`` held; no lock is held while a callback runs.

    **For transports built on MemoryTransport** (the TCP server and client,
    the ``eventforge_ext`` brokers: each keeps one as ``_local`` for the
    delivery in its own process).  They use these and the public API, never
    its attributes:

    - :meth:`_match` ``(topic)``: the subscriptions matching ``topic`` (the
      trie and its cache);
    - :meth:`_deliver` ``(message, taken)``: the delivery model minus the
      callbacks (inbox, blocked receiver or mailbox); returns the matching
      subscriptions;
    - :meth:`_run_subscriptions` ``(subscriptions, message)``: run them,
      failures handled as in :meth:`send`;
    - :meth:`_drain_mailbox` ``(topic)``: pop every message kept for a topic;
    - :meth:`_open_inbox` ``(topic, kind, on_close)``: an inbox made by
      ``kind`` (an :class:`Inbox` subclass), ``on_close`` called once it is
      withdrawn here;
    - :meth:`_subscription_patterns`: the patterns subscribed (for Monitor);
    - :attr:`closed`, and :func:`_refuse_receive_pattern` for the error
      ``receive`` raises for a pattern.
    """

    #: Seconds between two log lines about drops on the same topic.
    drop_log_interval = 60.0
    _DROP_LOG_TOPICS = 20  # distinct topics logged per interval, at most

    def __init__(
        self, max_queue_size: int = 1000, *, max_buffered: int = DEFAULT_MAX_BUFFERED
    ) -> None:
        for name, value in (("max_queue_size", max_queue_size), ("max_buffered", max_buffered)):
            if type(value) is not int or value < 1:
                raise ValueError(f"{name} must be a positive int, not {value!r}")
        self.max_queue_size = max_queue_size
        self.max_buffered = max_buffered
        self._lock = threading.Lock()
        self._subscriptions = SubscriptionTrie()
        # Each mailbox holds (sequence, message); _order maps every retained
        # sequence number to its topic, oldest first, for the total cap.
        self._mailboxes: Dict[str, Deque[Tuple[int, Message]]] = {}
        self._order: collections.OrderedDict[int, str] = collections.OrderedDict()
        self._seq = itertools.count()
        self._waiters: Dict[str, Deque[_Waiter]] = {}
        self._inboxes: Dict[str, Inbox] = {}
        self._sub_ids = itertools.count(1)
        self._closed = False
        self._sent = _Counter()  # ticked without a lock on the fast path
        self._handler_errors = 0
        self._drops = {"topic_full": 0, "buffer_full": 0, "no_inbox": 0}
        self._drop_log_since = -1e9  # monotonic start of the current log interval
        self._drop_logged: Dict[str, int] = {}  # topics logged since _drop_log_since

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    def send(self, message: Message) -> None:
        """Deliver ``message`` to subscribers, a receiver or the mailbox."""
        topic = message.topic
        if type(topic) is not str or topic not in _VALID_TOPICS:
            validate_topic(topic)
        if self._closed:
            raise TransportClosedError("MemoryTransport is closed")
        trie = self._subscriptions
        subscriptions = trie._cache.get(topic)  # see SubscriptionTrie
        if subscriptions is None:
            subscriptions = trie.match(topic)
        # Fast path: subscribers only.  Receivers and inboxes need the lock.
        if self._inboxes or self._waiters or not subscriptions:
            with self._lock:
                if self._closed:
                    raise TransportClosedError("MemoryTransport is closed")
                if not self._hand_over(topic, message) and not subscriptions:
                    self._keep(topic, message)
        next(self._sent.ticks)
        # The loop of _run_subscriptions, inlined: this is the publish path.
        for subscription in subscriptions:
            if subscription.active:
                try:
                    subscription.callback(message)
                except BaseException as exc:  # any failure is that call's only
                    self._handler_failed(subscription, message, exc)

    # -- for transports built on MemoryTransport (see the class docstring) ----------

    def _match(self, topic: str) -> Tuple[_Subscription, ...]:
        """The subscriptions whose pattern matches ``topic``, oldest first."""
        return self._subscriptions.match(topic)

    def _deliver(self, message: Message, taken: bool) -> Tuple[_Subscription, ...]:
        """Hand ``message`` to an inbox, a blocked receiver or the mailbox; return
        the matching subscriptions, which the caller runs (inline or on a dispatcher).

        ``taken`` says a remote peer already took the message, so it is not
        kept in a mailbox.  A mailbox past its bounds drops its oldest
        message; never raises TransportFullError.  Raises
        TransportClosedError after close.
        """
        topic = message.topic
        # match() skips the walk and the cache for a topic no pattern can
        # match (typical for reply topics): one-off topics stay out of it.
        subscriptions: Tuple[_Subscription, ...] = self._subscriptions.match(topic)
        if not subscriptions:
            inbox = self._inboxes.get(topic)
            if inbox is not None:  # a reply for a waiting requester: its inbox locks itself
                if self._closed:
                    raise TransportClosedError("transport is closed")
                next(self._sent.ticks)
                inbox.put(message)
                return subscriptions
        if taken and not subscriptions and topic not in self._waiters:
            # Nothing here can take it (a reply going to its requester, say): no lock.
            if self._closed:
                raise TransportClosedError("transport is closed")
            next(self._sent.ticks)
            return subscriptions
        with self._lock:
            if self._closed:
                raise TransportClosedError("transport is closed")
            next(self._sent.ticks)
            if not self._hand_over(topic, message) and not subscriptions and not taken:
                self._keep(topic, message)
        return subscriptions

    def _run_subscriptions(
        self, subscriptions: Tuple[_Subscription, ...], message: Message
    ) -> None:
        """Call each still-active subscription; failures go to _handler_failed.

        The TCP transports deliver network messages through this, on their
        dispatch threads, which must survive whatever a handler raises
        (``asyncio.CancelledError``, ``SystemExit`` ... included): it is a
        failure of that call only.
        """
        for subscription in subscriptions:
            if subscription.active:
                try:
                    subscription.callback(message)
                except BaseException as exc:  # any failure is that call's only
                    self._handler_failed(subscription, message, exc)

    def _hand_over(self, topic: str, message: Message) -> bool:
        # Give the message to an open inbox or the oldest blocked receiver.
        # Called with self._lock held.
        if self._inboxes:
            inbox = self._inboxes.get(topic)
            if inbox is not None:
                inbox.put(message)
                return True
        if self._waiters:
            waiters = self._waiters.get(topic)
            if waiters:
                waiter = waiters.popleft()
                if not waiters:
                    del self._waiters[topic]
                waiter.fulfil(message)
                return True
        return False

    def _keep(self, topic: str, message: Message) -> None:
        # Called with self._lock held, for a message nobody took: retain it,
        # dropping the oldest past either bound.  Never raises.
        if topic.startswith(INBOX_PREFIXES):
            note = self._count_drop(topic, "no_inbox")
        else:
            note = None
            seq = next(self._seq)
            mailbox = self._mailboxes.get(topic)
            if mailbox is None:
                self._mailboxes[topic] = collections.deque(((seq, message),))
            else:
                if len(mailbox) >= self.max_queue_size:
                    del self._order[mailbox.popleft()[0]]
                    note = self._count_drop(topic, "topic_full")
                mailbox.append((seq, message))
            order = self._order
            order[seq] = topic
            if len(order) > self.max_buffered:  # (never together with topic_full)
                oldest_topic = order.popitem(last=False)[1]
                oldest_box = self._mailboxes[oldest_topic]
                oldest_box.popleft()  # per-topic FIFO: its head is the globally oldest
                if not oldest_box:
                    del self._mailboxes[oldest_topic]
                note = self._count_drop(oldest_topic, "buffer_full")
        if note is not None:
            # The state is consistent again: log with the lock released, since
            # a logging handler is user code and may publish here.
            self._lock.release()
            try:
                logger.log(*note)
            finally:
                self._lock.acquire()

    def _count_drop(self, topic: str, reason: str) -> Optional[Tuple[Any, ...]]:
        # Count a drop; return the log call's arguments at most once per topic
        # (and for a few topics) per drop_log_interval, else None.
        self._drops[reason] += 1
        now = time.monotonic()
        logged = self._drop_logged
        if now - self._drop_log_since >= self.drop_log_interval:
            self._drop_log_since = now
            logged.clear()
        if topic in logged or len(logged) >= self._DROP_LOG_TOPICS:
            return None
        logged[topic] = 1
        if reason == "no_inbox":  # a late reply: normal after a timeout
            return (logging.DEBUG, "dropped a message on %r: nobody awaits that reply", topic)
        if reason == "topic_full":
            why = f"its mailbox holds max_queue_size={self.max_queue_size}"
        else:
            why = f"all mailboxes together hold max_buffered={self.max_buffered}"
        return (
            logging.WARNING,
            "dropped the oldest unclaimed message on %r: %s and nobody subscribed or "
            "received (drops are counted in stats, logged at most every %g s per topic)",
            topic, why, self.drop_log_interval,
        )

    def _unkeep(self, topic: str) -> List[Message]:
        # Called with self._lock held: take a topic's whole mailbox.
        mailbox = self._mailboxes.pop(topic, ())
        order = self._order
        for seq, _ in mailbox:
            del order[seq]
        return [message for _, message in mailbox]

    def _drain_mailbox(self, topic: str) -> List[Message]:
        """Remove and return every message kept for ``topic``, oldest first."""
        with self._lock:
            return self._unkeep(topic)

    def _open_inbox(
        self,
        topic: str,
        kind: Callable[..., Inbox] = Inbox,
        on_close: Optional[Callable[[Inbox], None]] = None,
    ) -> Inbox:
        """:meth:`open_inbox` with an inbox made by ``kind(topic, on_close=, maxsize=)``
        (an :class:`Inbox` subclass); ``on_close(inbox)`` runs after the inbox
        is withdrawn here."""
        if not (topic.startswith(INBOX_PREFIXES) and len(topic) <= MAX_TOPIC_LENGTH
                and _TOPIC_RE.fullmatch(topic) is not None):
            # (A request's one-off topic, valid, stays out of validate_topic's
            # cache: thousands a second would keep clearing it.)
            _refuse_receive_pattern(topic)
            validate_topic(topic)
        if on_close is None:
            withdraw = self._close_inbox
        else:
            def withdraw(inbox: Inbox) -> None:
                self._close_inbox(inbox)
                on_close(inbox)

        inbox = kind(topic, on_close=withdraw, maxsize=self.max_queue_size)
        with self._lock:
            if self._closed:
                raise TransportClosedError("MemoryTransport is closed")
            if topic in self._inboxes:
                raise ValueError(f"an inbox for {topic!r} is already open")
            self._inboxes[topic] = inbox
            if self._mailboxes:
                for message in self._unkeep(topic):
                    inbox.put(message)
        return inbox

    def _subscription_patterns(self) -> List[str]:
        """The pattern of every subscription, oldest first (one per subscription)."""
        return self._subscriptions.patterns()

    def _handler_failed(
        self, subscription: _Subscription, message: Message, exc: BaseException
    ) -> None:
        _reraise_interrupt(exc)
        if subscription.on_error is not None:
            try:
                subscription.on_error(subscription.callback, message, exc)
                return
            except BaseException as hook_exc:  # report it; never propagate
                _reraise_interrupt(hook_exc)
                exc = hook_exc
        with self._lock:
            self._handler_errors += 1
        _report_unhandled(
            f"subscriber {_callable_name(subscription.callback)} on {subscription.pattern!r} "
            f"failed for message {message.id} on {message.topic!r}",
            exc,
        )

    def _take(
        self, topic: str, timeout: Optional[float]
    ) -> Tuple[Optional[Message], Optional[_Waiter]]:
        # Called with self._lock held: pop from the mailbox or register a waiter.
        mailbox = self._mailboxes.get(topic)
        if mailbox:
            seq, message = mailbox.popleft()
            del self._order[seq]
            if not mailbox:
                del self._mailboxes[topic]
            return message, None
        if self._closed or (timeout is not None and timeout <= 0):
            return None, None
        waiter = _Waiter()
        waiters = self._waiters.get(topic)
        if waiters is None:
            self._waiters[topic] = collections.deque((waiter,))
        else:
            waiters.append(waiter)
        return None, waiter

    def _abandon(self, topic: str, waiter: _Waiter) -> Callable[[], None]:
        def abandon() -> None:
            waiters = self._waiters.get(topic)
            if waiters is not None:
                waiters.remove(waiter)
                if not waiters:
                    del self._waiters[topic]

        return abandon

    def _requeue(self, topic: str) -> Callable[[Message], None]:
        def requeue(message: Message) -> None:
            with self._lock:
                if self._closed or self._hand_over(topic, message):
                    return
                # Kept again, and put back at the front: it was its topic's oldest.
                self._keep(topic, message)
                mailbox = self._mailboxes.get(topic)
                if mailbox and mailbox[-1][1] is message:
                    entry = mailbox.pop()
                    mailbox.appendleft(entry)
                    self._order.move_to_end(entry[0], last=False)

        return requeue

    def receive(self, topic: str, timeout: Optional[float] = None) -> Optional[Message]:
        """Take the next message on the exact ``topic``, waiting up to ``timeout``."""
        _refuse_receive_pattern(topic)
        validate_topic(topic)
        with self._lock:
            message, waiter = self._take(topic, timeout)
            if waiter is None:
                return message
            waiter.arm_sync()
        return _wait_sync(waiter, self._lock, timeout, self._abandon(topic, waiter))

    async def receive_async(
        self, topic: str, timeout: Optional[float] = None
    ) -> Optional[Message]:
        """Asyncio-native :meth:`receive`: exact timeout, nothing lost on cancel."""
        import asyncio

        _refuse_receive_pattern(topic)
        validate_topic(topic)
        loop = asyncio.get_running_loop()
        with self._lock:
            message, waiter = self._take(topic, timeout)
            if waiter is None:
                return message
            waiter.arm_async(loop)
        return await _wait_async(
            waiter, self._lock, timeout, self._abandon(topic, waiter), self._requeue(topic)
        )

    def subscribe(self, topic: str, callback: Callable[[Message], Any]) -> str:
        """Call ``callback(message)`` for each message matching the pattern ``topic``."""
        return self._add_subscription(topic, callback, None)

    def subscribe_handler(
        self,
        topic: str,
        handler: Callable[[Message], Any],
        on_error: Callable[[Any, Message, BaseException], Any],
    ) -> str:
        """Subscribe ``handler``, routing its exceptions to ``on_error`` (no wrapper)."""
        return self._add_subscription(topic, handler, on_error)

    def _add_subscription(
        self,
        topic: str,
        callback: Callable[[Message], Any],
        on_error: Optional[Callable[[Any, Message, BaseException], Any]],
    ) -> str:
        validate_pattern(topic)
        if not callable(callback):
            raise TypeError(f"callback must be callable, not {type(callback).__name__}")
        if self._closed:
            raise TransportClosedError("MemoryTransport is closed")
        sub_id = f"sub-{next(self._sub_ids)}"
        self._subscriptions.add(sub_id, topic, _Subscription(sub_id, topic, callback, on_error))
        return sub_id

    def unsubscribe(self, subscription_id: str) -> bool:
        """Remove a subscription; in-flight deliveries to it are skipped."""
        subscription = self._subscriptions.pop(subscription_id)
        if subscription is None:
            return False
        if not subscription.finish_queued:
            subscription.active = False
        return True

    def open_inbox(self, topic: str) -> Inbox:
        """Register an inbox for the exact ``topic`` (see :meth:`Transport.open_inbox`)."""
        return self._open_inbox(topic)

    def _close_inbox(self, inbox: Inbox) -> None:
        with self._lock:
            if self._inboxes.get(inbox.topic) is inbox:
                del self._inboxes[inbox.topic]

    def close(self) -> None:
        """Stop: wake blocked receivers with None, drop buffered messages."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            waiters = [w for queue in self._waiters.values() for w in queue]
            inboxes = list(self._inboxes.values())
            self._waiters.clear()
            self._mailboxes.clear()
            self._order.clear()
            self._inboxes.clear()
            for waiter in waiters:
                waiter.fulfil(None)
        self._subscriptions.clear()
        for inbox in inboxes:
            inbox.close()

    @property
    def stats(self) -> Dict[str, int]:
        """Counters and current sizes.

        ``dropped`` is the sum of ``dropped_topic_full`` (a mailbox held
        ``max_queue_size``), ``dropped_buffer_full`` (all mailboxes held
        ``max_buffered``) and ``dropped_no_inbox`` (a reply nobody awaited);
        ``buffered`` counts the unclaimed messages kept now.
        """
        with self._lock:
            drops = self._drops
            return {
                "sent": self._sent.value,
                "handler_errors": self._handler_errors,
                "dropped": sum(drops.values()),
                "dropped_topic_full": drops["topic_full"],
                "dropped_buffer_full": drops["buffer_full"],
                "dropped_no_inbox": drops["no_inbox"],
                "subscriptions": len(self._subscriptions),
                "mailboxes": len(self._mailboxes),
                "buffered": len(self._order),
                "receivers": sum(len(w) for w in self._waiters.values()),
                "inboxes": len(self._inboxes),
            }

    def debug_state(self) -> Dict[str, Any]:
        """Internal state, for tests and diagnostics only (not a stable API).

        ``mailboxes``: topic -> the unclaimed messages kept for it, oldest
        first (a copy: :meth:`receive` takes them, this only looks).
        """
        with self._lock:
            return {"mailboxes": {topic: [message for _, message in mailbox]
                                  for topic, mailbox in self._mailboxes.items()}}

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._subscriptions)} subscriptions"
        return f"<MemoryTransport {state}>"


# -- what the network transports share ----------------------------------------
#
# The TCP transports (section 11) and the broker adapters (eventforge_ext)
# build on these: a selector thread taking cross-thread calls (_Loop), a
# thread running subscriber callbacks in order (_Dispatcher), a rate-limited
# log line (_LogLimiter).

_perf_counter = time.perf_counter
_monotonic = time.monotonic
_DISPATCH_HIGH_WATER = 20000  # stop reading sockets while this many deliveries wait
_DISPATCH_LOW_WATER = 5000
_MAX_DISPATCH_THREADS = 32  # callbacks waiting for a reply, plus the one dispatching


class _LogLimiter:
    """Logs a recurring event at most once per ``interval`` seconds, with a count.

    For events a peer can repeat at will (a dropped frame, an expired
    request): one line per interval says how many there were, so the log
    stays readable and cheap.  Any thread may call :meth:`log`.
    """

    __slots__ = ("interval", "level", "_lock", "_next", "_skipped")

    def __init__(self, interval: float = 10.0, level: int = logging.WARNING) -> None:
        self.interval = interval
        self.level = level
        self._lock = threading.Lock()
        self._next = 0.0
        self._skipped = 0

    def log(self, msg: str, *args: Any) -> None:
        now = _monotonic()
        with self._lock:
            if now < self._next:
                self._skipped += 1
                return
            skipped, self._skipped = self._skipped, 0
            self._next = now + self.interval
        if skipped:
            msg += " (%d more since the last such line)"
            args += (skipped,)
        logger.log(self.level, msg, *args)


def _socketpair() -> Tuple[socket.socket, socket.socket]:
    import socket

    try:
        a, b = socket.socketpair()
    except (AttributeError, OSError):  # pragma: no cover - very old Windows
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        a = socket.create_connection(listener.getsockname())
        b, _ = listener.accept()
        listener.close()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


class _Loop:
    """A selector thread: readiness events, a wake-up socket and cross-thread calls."""

    def __init__(self, name: str) -> None:
        import selectors

        self.name = name
        self.selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = _socketpair()
        self.selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._calls: Deque[Callable[[], Any]] = collections.deque()
        self._woken = False
        self.thread: Optional[threading.Thread] = None
        self.ident: Optional[int] = None

    def start(self, target: Callable[[], None]) -> None:
        # Daemonic only so that a forgotten close() cannot hang interpreter
        # exit; close() always stops and joins it.
        self.thread = threading.Thread(target=target, name=self.name, daemon=True)
        self.thread.start()

    def in_loop(self) -> bool:
        return threading.get_ident() == self.ident

    def call_soon(self, func: Callable[[], Any]) -> None:
        """Run ``func`` on the loop thread (thread-safe)."""
        self._calls.append(func)
        self.wake()

    def wake(self) -> None:
        if self._woken:
            return
        self._woken = True
        try:
            self._wake_w.send(b"\0")
        except OSError:  # buffer full (already awake) or closed
            pass

    def run_calls(self, drain: bool = False) -> None:
        if drain:
            self._woken = False
            try:
                while True:
                    self._wake_r.recv(4096)
            except OSError:
                pass
        calls = self._calls
        while calls:
            try:
                calls.popleft()()
            except Exception:
                logger.exception("%s: internal call failed", self.name)

    def close(self) -> None:
        for sock in (self._wake_r, self._wake_w):
            try:
                sock.close()
            except OSError:
                pass
        self.selector.close()


class _Dispatcher:
    """Runs subscriber callbacks for network messages on one named thread, in order.

    The I/O thread hands over batches; a handler may block (on a request over
    the very same connection, say) without stalling any socket.  ``backlog``
    lets the I/O thread stop reading while too much waits here.  A bare lock
    serves as the wake-up signal: cheaper than a Condition on this hot path.

    A callback about to wait for a message (a request's reply, say) calls
    :meth:`hand_off_if_current`: a new thread takes over the queue, so a
    reply that must itself pass through a callback is not stuck behind the
    waiting one; the old thread ends when its callback returns.  At most
    ``_MAX_DISPATCH_THREADS`` threads exist; beyond that the callback waits
    in place (until its timeout, if its reply needs the queue).

    Locks: ``_mutex`` guards the queue and the thread bookkeeping;
    ``_signal`` is only ever released and acquired as a wake-up, never
    held together with ``_mutex``.
    """

    def __init__(self, name: str, local: MemoryTransport, on_low: Callable[[], None],
                 run: Optional[Callable[..., None]] = None) -> None:
        self.name = name
        self._local = local
        self._on_low = on_low
        # Called with each item's fields; by default items are (subscriptions, message).
        self._call = run if run is not None else local._run_subscriptions
        self._mutex = threading.Lock()
        self._signal = threading.Lock()
        self._signal.acquire()
        self._items: Deque[Tuple[Any, ...]] = collections.deque()
        self._batch: Deque[Tuple[Any, ...]] = collections.deque()
        self._thread: Optional[threading.Thread] = None  # the one dispatching now
        self._threads: List[threading.Thread] = []  # every one started and maybe alive
        self._sleeping = False
        self._idle = True
        self._stopping = False
        self.backlog = 0
        self.high = False

    def _start_thread(self) -> None:
        # Called with _mutex held.
        self._threads = [t for t in self._threads if t.is_alive()]
        name = self.name if not self._threads else f"{self.name}-{len(self._threads)}"
        thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread = thread
        self._threads.append(thread)
        thread.start()

    def put_many(self, items: List[Tuple[Any, ...]]) -> None:
        wake = False
        with self._mutex:
            if self._stopping:
                return
            self._items.extend(items)
            self.backlog += len(items)
            if self.backlog > _DISPATCH_HIGH_WATER:
                self.high = True
            self._idle = False
            if self._thread is None:
                self._start_thread()
            elif self._sleeping:
                self._sleeping = False
                wake = True
        if wake:
            self._signal.release()

    def hand_off_if_current(self) -> None:
        """If the calling thread is the dispatcher, let a new thread take the queue over."""
        if self._thread is not threading.current_thread():
            return
        with self._mutex:
            if self._thread is not threading.current_thread() or self._stopping:
                return
            if sum(1 for t in self._threads if t.is_alive()) >= _MAX_DISPATCH_THREADS:
                return
            batch = self._batch  # the rest of this thread's batch goes first
            self._items.extendleft(reversed(batch))
            batch.clear()
            self._idle = not self._items
            self._sleeping = False
            self._start_thread()

    def _run(self) -> None:
        me = threading.current_thread()
        mutex = self._mutex
        while True:
            with mutex:
                if self._thread is not me:  # handed off while a callback waited
                    return
                if not self._items:
                    self._idle = True
                    if self._stopping:
                        return
                    self._sleeping = True
                    batch = None
                else:
                    batch = self._batch = self._items
                    self._items = collections.deque()
            if batch is None:
                self._signal.acquire()
                continue
            call = self._call
            done = 0
            while batch:
                item = batch.popleft()
                done += 1
                try:
                    call(*item)
                except BaseException:  # whatever user code raised, this thread goes on
                    logger.exception("%s: a handler call failed", self.name)
            with mutex:
                self.backlog -= done
                resume = self.high and self.backlog < _DISPATCH_LOW_WATER
                if resume:
                    self.high = False
            if resume:
                self._on_low()

    def drain(self, timeout: float) -> bool:
        """Wait until every handed-over message was dispatched."""
        if self._thread is threading.current_thread():
            return False
        deadline = time.monotonic() + timeout
        while not self._idle:  # only used while closing: polling is fine
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.002)
        return True

    def stop(self, timeout: float) -> int:
        """Deliver what is queued (up to ``timeout`` in all), then end the threads.

        Returns how many queued items were dropped, not run.
        """
        deadline = _monotonic() + timeout
        self.drain(timeout)
        with self._mutex:
            self._stopping = True
            dropped = len(self._items)
            self._items.clear()
            self.backlog = 0
            wake = self._sleeping
            self._sleeping = False
            threads = list(self._threads)
        if wake:
            self._signal.release()
        if dropped:
            logger.warning("%s: %d messages not delivered at close", self.name, dropped)
        current = threading.current_thread()
        for thread in threads:
            if thread is not current:
                thread.join(max(0.0, deadline - _monotonic()))
        return dropped


# ---------------------------------------------------------------------------
# 5. Queues: MessageQueue
# ---------------------------------------------------------------------------

_CO_COROUTINE = 0x80  # inspect.CO_COROUTINE, without importing inspect


#: Reserved request header: milliseconds the requester will still wait, as
#: of sending.  Relative (like gRPC's grpc-timeout), so clock skew between
#: hosts does not matter; a server may skip a request whose TTL ran out.
TTL_HEADER = "_ttl_ms"


def _set_ttl(headers: Dict[str, Any], timeout: Optional[float]) -> None:
    if timeout is not None:
        headers[TTL_HEADER] = max(0, int(timeout * 1000))


def _is_async_callable(func: Any) -> bool:
    code = getattr(getattr(func, "__func__", func), "__code__", None)
    return code is not None and bool(code.co_flags & _CO_COROUTINE)


class MessageQueue:
    """Topic-keyed pub-sub and request-reply over one Transport.

    The default transport is an in-process :class:`MemoryTransport`; pass a
    TCP (or broker) transport to reach other processes with the same API.
    Closing the queue closes its transport.

    A handler that raises (anything, ``BaseException`` included) never
    disturbs the publisher or other handlers: the error goes to
    ``on_error(exc, message)`` when given, and is always counted in
    :attr:`stats`.  Without ``on_error`` it is logged at ERROR if the
    application configured logging, else printed to stderr with its
    traceback (as ``threading.excepthook`` does): never silently lost.
    """

    def __init__(
        self,
        transport: Optional[Transport] = None,
        *,
        on_error: Optional[Callable[[BaseException, Message], Any]] = None,
    ) -> None:
        self.transport: Transport = transport if transport is not None else MemoryTransport()
        self._send = self.transport.send
        self.on_error = on_error
        self._lock = threading.Lock()
        self._handlers: Dict[str, Callable[[Message], Any]] = {}
        self._handler_errors = 0

    # -- pub-sub ---------------------------------------------------------------

    def publish(self, topic: str, payload: Any = None, **headers: Any) -> str:
        """Publish ``payload`` on ``topic``; keyword arguments become headers.

        Returns the message id.
        """
        message = _make_message(topic, payload, headers)
        self._send(message)
        return message.id

    def send(self, message: Message) -> str:
        """Publish a prepared :class:`Message` (e.g. one carrying ``reply_to``)."""
        self.transport.send(message)
        return message.id

    def subscribe(self, topic: str, handler: Callable[[Message], Any]) -> str:
        """Call ``handler(message)`` for messages matching the pattern ``topic``.

        Returns a handler id for :meth:`unsubscribe`.
        """
        if not callable(handler):
            raise TypeError(f"handler must be callable, not {type(handler).__name__}")
        if _is_async_callable(handler):
            raise TypeError(
                f"handler {_callable_name(handler)} is a coroutine function; "
                "subscribe a plain function (use receive_async() in asyncio code)"
            )
        handler_id = self.transport.subscribe_handler(topic, handler, self._handler_failed)
        with self._lock:
            self._handlers[handler_id] = handler
        return handler_id

    def on(self, topic: str, handler: Optional[Callable[[Message], Any]] = None) -> Any:
        """Subscribe ``handler`` to ``topic``; without ``handler``, a decorator.

        Both forms return the handler itself, so a decorated function stays
        callable; pass the function to :meth:`unsubscribe` to remove it.
        """
        if handler is not None:
            self.subscribe(topic, handler)
            return handler

        def decorator(func: Callable[[Message], Any]) -> Callable[[Message], Any]:
            self.subscribe(topic, func)
            return func

        return decorator

    def unsubscribe(self, handler_id: Any) -> bool:
        """Remove a subscription by id, or every subscription of a handler function.

        Returns True if anything was removed.
        """
        with self._lock:
            if isinstance(handler_id, str):
                ids = [handler_id] if self._handlers.pop(handler_id, None) is not None else []
            else:
                ids = [key for key, func in self._handlers.items() if func == handler_id]
                for key in ids:
                    del self._handlers[key]
        removed = False
        for key in ids:
            removed = self.transport.unsubscribe(key) or removed
        return removed

    def _handler_failed(self, handler: Any, message: Message, exc: BaseException) -> None:
        _reraise_interrupt(exc)
        with self._lock:
            self._handler_errors += 1
        what = (f"handler {_callable_name(handler)} failed for message {message.id} "
                f"on {message.topic!r}")
        if self.on_error is not None:
            try:
                self.on_error(exc, message)
                return
            except BaseException as hook_exc:  # its traceback chains the handler's
                _reraise_interrupt(hook_exc)
                what, exc = f"on_error hook failed while handling: {what}", hook_exc
        _report_unhandled(what, exc)

    # -- point-to-point -------------------------------------------------------

    def receive(self, topic: str, timeout: Optional[float] = None) -> Optional[Message]:
        """Take the next message on the exact ``topic``; None on timeout."""
        return self.transport.receive(topic, timeout)

    async def receive_async(
        self, topic: str, timeout: Optional[float] = None
    ) -> Optional[Message]:
        """Asyncio-native :meth:`receive`."""
        return await self.transport.receive_async(topic, timeout)

    # -- request-reply --------------------------------------------------------

    def _prepare_request(
        self, topic: str, payload: Any, headers: Dict[str, Any], timeout: Optional[float]
    ) -> Tuple[Message, Inbox]:
        _set_ttl(headers, timeout)
        message = _make_message(topic, payload, headers)
        message.reply_to = "_reply." + message.id
        return message, self.transport.open_inbox(message.reply_to)

    def request(
        self, topic: str, payload: Any = None, timeout: Optional[float] = 30.0, **headers: Any
    ) -> Optional[Message]:
        """Publish a request and wait for the reply ``Message``; None on timeout.

        The responder answers with :meth:`reply`.  A reply arriving after the
        timeout is discarded.  The request carries the header ``_ttl_ms`` (the
        timeout in milliseconds), so a server can skip it once nobody waits.
        """
        message, inbox = self._prepare_request(topic, payload, headers, timeout)
        try:
            self.transport.send(message)
            return inbox.get(timeout)
        finally:
            inbox.close()

    async def request_async(
        self, topic: str, payload: Any = None, timeout: Optional[float] = 30.0, **headers: Any
    ) -> Optional[Message]:
        """Asyncio-native :meth:`request`."""
        message, inbox = self._prepare_request(topic, payload, headers, timeout)
        try:
            self.transport.send(message)
            return await inbox.get_async(timeout)
        finally:
            inbox.close()

    def reply(self, original: Message, payload: Any = None, **headers: Any) -> str:
        """Answer the request ``original``; returns the reply's message id.

        Raises ValueError if ``original`` has no ``reply_to``.
        """
        if not original.reply_to:
            raise ValueError(
                f"cannot reply to message {original.id} on {original.topic!r}: "
                "it has no reply_to (it was published, not sent with request())"
            )
        message = _make_message(
            original.reply_to, payload, headers, None, original.correlation_id or original.id
        )
        self.transport.send(message)
        return message.id

    # -- lifecycle --------------------------------------------------------------

    @property
    def stats(self) -> Dict[str, Any]:
        """Handler failures seen by this queue plus the transport's counters."""
        return {"handler_errors": self._handler_errors, "transport": self.transport.stats}

    def close(self) -> None:
        """Close the queue and its transport."""
        with self._lock:
            self._handlers.clear()
        self.transport.close()

    def __enter__(self) -> MessageQueue:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<MessageQueue on {self.transport!r}>"


# ---------------------------------------------------------------------------
# 6. Execution: Executor
# ---------------------------------------------------------------------------

# Executor runs callables in this process: inline (SEQUENTIAL), on a thread
# pool of its own (THREAD: _ThreadPool, whose per-task handle _Job is much
# lighter than a concurrent.futures Future) or a ProcessPoolExecutor (PROCESS).
# Every task ends as a TaskResult; a failure never escapes as an exception
# from ``result``.  Bookkeeping is bounded: a result is forgotten once
# collected, and at most ``max_results`` uncollected tasks are remembered (the
# oldest is dropped beyond that).  ``concurrent.futures``, ``queue`` and
# ``asyncio`` are imported on first use.



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
        self.status = status if type(status) is TaskStatus else TaskStatus(status)
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

        Re-raises the task's own exception when it is available, else a
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
    come, as eventforge 0.1 reported it) and a :class:`KeyError` (a lookup of
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
        task_id, TaskStatus.FAILED, None, _exception_text(exc), type(exc).__name__,
        execution_time, worker_id, tb, exc,
    )


def _exception_text(exc: BaseException) -> str:
    """``str(exc)``, or a placeholder when the exception's ``__str__`` fails."""
    try:
        return str(exc)
    except BaseException as failure:  # a broken __str__ must not escape
        return f"<str() of the {type(exc).__name__} failed: {type(failure).__name__}>"


_current_thread = threading.current_thread


def _run_task(task_id: str, func: Callable[..., Any], args: Tuple[Any, ...],
              kwargs: Dict[str, Any], in_process: bool = False) -> TaskResult:
    """Run one task (inline, on a pool thread or in a pool process); never raises.

    ``worker_id`` is the thread's name, or ``"pid:<n>"`` in a worker process.
    """
    worker = f"pid:{os.getpid()}" if in_process else _current_thread().name
    start = _perf_counter()
    try:
        value = func(*args, **kwargs)
    except BaseException as exc:  # SystemExit, CancelledError ... fail this task only
        if not in_process:
            _reraise_interrupt(exc)
        return _failure(task_id, exc, _perf_counter() - start, worker)
    return TaskResult(task_id, TaskStatus.COMPLETED, value, None, None,
                      _perf_counter() - start, worker)


def _task_result(task_id: str, future: _Handle,
                 timeout: Optional[float] = 0.0) -> Optional[TaskResult]:
    """Wait up to ``timeout`` s (None: no limit) for a task's Future; its TaskResult.

    Returns None when the Future is still pending at the deadline.  A Future
    that holds no TaskResult still gives one: CANCELLED when ``stop(wait=False)``
    cancelled it, FAILED when the call never ran (it could not be pickled,
    its return value could not be sent back, or the process pool broke).
    ``Future.result`` wakes for a cancelled Future too (``concurrent.futures.wait``
    would not, after ``shutdown(cancel_futures=True)``).
    """
    try:
        return future.result(timeout)
    except BaseException as exc:
        if not future.done():
            import concurrent.futures as cf

            if isinstance(exc, cf.TimeoutError):
                return None
            raise  # interrupted while waiting (Ctrl-C): not the task's outcome
        if future.cancelled():
            return _cancelled_result(task_id)
        result = _failure(task_id, exc)
        cause = str(exc.__cause__ or "")
        if "in _feed" in cause and result.error_type != "PicklingError":
            # Python 3.12+ reports some pickling failures as AttributeError or
            # TypeError; name them for what they are.
            result.error = (f"the task could not be pickled for a worker process: "
                            f"{result.error_type}: {result.error}")
            result.error_type = "PicklingError"
        return result


def _outcome(task_id: str, future: _Handle) -> TaskResult:
    """The TaskResult of a task's Future, waiting for as long as it takes."""
    result = _task_result(task_id, future, None)
    assert result is not None  # no deadline: never pending
    return result


def _check_timeout(timeout: Optional[float]) -> Optional[float]:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout must be a number of seconds or None, not {timeout!r}")
    if timeout != timeout or timeout < 0:
        raise ValueError(f"timeout must be >= 0, not {timeout!r}")
    return float(timeout)


_DoneFuture: Any = None  # the class below, made on first use


def _done_future(result: TaskResult) -> Future[TaskResult]:
    """An already-completed ``concurrent.futures.Future`` holding ``result``.

    A SEQUENTIAL task is "done now"; handing it back as a done Future lets
    every caller take the one "done later" path (``add_done_callback`` runs
    the callback at once, ``result()`` returns at once).  ``Future()`` plus
    ``set_result`` costs about 2.7 us (a Condition each, a notify) against a
    2 us task; this subclass is born FINISHED and shares one Condition, which
    is safe as nothing ever waits on or notifies a finished Future.  Every
    ``Future`` method (``concurrent.futures.wait`` included) works unchanged.
    The class is made on first use: ``concurrent.futures`` is not imported
    with eventforge.
    """
    cls = _DoneFuture or _make_done_future_class()
    return cls(result)


def _make_done_future_class() -> Any:
    global _DoneFuture
    import concurrent.futures as cf
    from concurrent.futures import _base

    class DoneFuture(cf.Future):
        __doc__ = _done_future.__doc__
        _condition = threading.Condition()  # shared: held for an instant, never waited on
        _state = _base.FINISHED
        _exception = None

        def __init__(self, result: Any) -> None:  # no super(): no Condition of its own
            self._result = result
            self._waiters: List[Any] = []  # concurrent.futures' private waiter objects
            self._done_callbacks: List[Callable[[Future[Any]], object]] = []

        # The hot paths, without the lock: a finished Future never changes state.
        def done(self) -> bool:
            return True

        def result(self, timeout: Optional[float] = None) -> Any:
            return self._result

    _DoneFuture = DoneFuture
    return DoneFuture


def _cancelled_result(task_id: str) -> TaskResult:
    """The TaskResult of a task cancelled before it ran."""
    return TaskResult(task_id, TaskStatus.CANCELLED, error="task was cancelled",
                      error_type="CancelledError")


class _QueuedCall:
    """A call waiting in a :class:`_ThreadPool` queue (base of the two kinds)."""

    __slots__ = ("task_id", "_call")

    def __init__(self, task_id: str, func: Callable[..., Any], args: Tuple[Any, ...],
                 kwargs: Dict[str, Any]) -> None:
        self.task_id = task_id
        self._call: Optional[Tuple[Callable[..., Any], Tuple[Any, ...], Dict[str, Any]]] = \
            (func, args, kwargs)

    def run(self) -> None:
        """Run the call on a pool thread, unless it was cancelled first."""
        raise NotImplementedError

    def cancel(self) -> bool:
        """Cancel the call if it has not started; True if it is (now) cancelled."""
        raise NotImplementedError


class _Job(_QueuedCall):
    """A THREAD-mode task: the call, and the handle the result table keeps for it.

    It answers the ``concurrent.futures.Future`` methods the executor's read
    paths use (``result``, ``done``, ``running``, ``cancelled``, ``cancel``,
    ``add_done_callback``) for a fraction of a Future's cost: two raw locks,
    no Condition.  ``_claim`` goes to whoever comes first, the worker that
    runs the task or :meth:`cancel`.  ``_done`` is held from birth until the
    outcome is set, so waiting is acquiring it (and releasing it at once for
    the next waiter).  ``result`` returns a TaskResult, CANCELLED included;
    only a timeout raises (``concurrent.futures.TimeoutError``, as a Future).
    """

    __slots__ = ("_outcome", "_claim", "_done", "_callbacks")

    _callbacks_lock = threading.Lock()  # creates a job's callback list, once

    def __init__(self, task_id: str, func: Callable[..., Any], args: Tuple[Any, ...],
                 kwargs: Dict[str, Any]) -> None:
        super().__init__(task_id, func, args, kwargs)
        self._outcome: Optional[TaskResult] = None
        self._claim = threading.Lock()
        self._done = done = threading.Lock()
        done.acquire()
        self._callbacks: Optional[List[Callable[[_Job], object]]] = None

    def run(self) -> None:
        if self._claim.acquire(False):
            call, self._call = self._call, None
            assert call is not None
            self._finish(_run_task(self.task_id, *call))

    def cancel(self) -> bool:
        if self._claim.acquire(False):
            self._call = None
            self._finish(_cancelled_result(self.task_id))
            return True
        return self.cancelled()

    def _finish(self, outcome: TaskResult) -> None:
        self._outcome = outcome  # before the release: done() reads it
        self._done.release()
        if self._callbacks is not None:  # read after the outcome is set: see add_done_callback
            self._run_callbacks()

    def done(self) -> bool:
        return self._outcome is not None

    def running(self) -> bool:
        return self._claim.locked() and self._outcome is None

    def cancelled(self) -> bool:
        outcome = self._outcome
        return outcome is not None and outcome.status is TaskStatus.CANCELLED

    def result(self, timeout: Optional[float] = None) -> TaskResult:
        outcome = self._outcome
        if outcome is None:
            done = self._done
            if not done.acquire(True, -1 if timeout is None else timeout):
                import concurrent.futures as cf

                raise cf.TimeoutError()
            done.release()
            outcome = self._outcome
            assert outcome is not None
        return outcome

    def add_done_callback(self, fn: Callable[[_Job], object]) -> None:
        """Call ``fn(job)`` once the task is done (at once if it is)."""
        with self._callbacks_lock:
            if self._callbacks is None:
                self._callbacks = []
        self._callbacks.append(fn)
        if self._outcome is not None:  # else _finish, setting it later, runs fn
            self._run_callbacks()

    def _run_callbacks(self) -> None:
        # The finishing worker and a late add_done_callback may both get here:
        # list.pop is atomic, so each callback runs exactly once.
        callbacks = self._callbacks
        assert callbacks is not None
        while callbacks:
            try:
                fn = callbacks.pop()
            except IndexError:  # the other thread took the last one
                return
            try:
                fn(self)
            except Exception:
                logger.exception("Executor: a done-callback of task %s failed", self.task_id)


class _FutureJob(_QueuedCall):
    """A THREAD-mode :meth:`Executor.submit_future` call: settles its Future."""

    __slots__ = ("future",)

    def __init__(self, future: Future[TaskResult], task_id: str, func: Callable[..., Any],
                 args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
        super().__init__(task_id, func, args, kwargs)
        self.future = future

    def run(self) -> None:
        call, self._call = self._call, None
        if self.future.set_running_or_notify_cancel():
            assert call is not None
            self.future.set_result(_run_task(self.task_id, *call))

    def cancel(self) -> bool:
        return self.future.cancel()


class _ThreadPool:
    """THREAD mode's workers: up to ``max_workers`` named threads, one queue of calls.

    ``ThreadPoolExecutor`` spends a Future (a Condition), a work item, two
    locks and a semaphore round trip on every task, about as much as the rest
    of a submit-then-collect together; here a task is one queue put and one
    get, and its handle a :class:`_Job`.  Threads start with the first
    submits, up to ``max_workers``.  Each worker leaves on a ``None``, which
    :meth:`shutdown` sends (after the queued calls, or after cancelling
    them), as does the pool's garbage collection.  At interpreter exit the
    workers of every pool finish the calls queued so far and are joined, as
    ``concurrent.futures`` does; they are daemon threads so that exit can
    first reach that point.

    Not locked on its own: the :class:`Executor` calls :meth:`put` under its
    lock while the pool is its current one, and :meth:`shutdown` once, after
    detaching it under that lock, so no call is queued behind the ``None``s.
    """

    _exit_lock = threading.Lock()
    _exit_queues: Optional[weakref.WeakKeyDictionary[threading.Thread, Any]] = None
    _exited = False  # the workers were stopped for interpreter exit

    def __init__(self, max_workers: int, name: str) -> None:
        import queue

        self._queue: queue.SimpleQueue[Optional[_QueuedCall]] = queue.SimpleQueue()
        self._max_workers = max_workers
        self._name = name
        self._threads: List[threading.Thread] = []
        # One token per worker done with a task and not yet given another (a
        # put takes one): start a thread only when none is free, as
        # ThreadPoolExecutor's idle semaphore does.  Atomic list appends and pops.
        self._idle: List[None] = []
        # The workers hold the queue, not the pool: when the pool is collected
        # without a shutdown, this sends them their ``None``s.
        self._release = weakref.finalize(self, _ThreadPool._send_stops, self._queue,
                                         self._threads)

    def put(self, call: _QueuedCall) -> None:
        """Queue ``call``; start a worker if none is free and there are fewer
        than ``max_workers``."""
        if _ThreadPool._exited:  # as concurrent.futures does: nobody would run it
            raise RuntimeError("cannot schedule new tasks after interpreter shutdown")
        self._queue.put(call)
        if self._idle:
            self._idle.pop()  # puts are serialised: a token seen is still there
        elif len(self._threads) < self._max_workers:
            self._add_worker()

    def _add_worker(self) -> None:
        thread = threading.Thread(target=_ThreadPool._work,
                                  args=(self._queue.get, self._idle.append),
                                  name=f"{self._name}_{len(self._threads)}", daemon=True)
        thread.start()
        self._threads.append(thread)
        _ThreadPool._join_at_exit(thread, self._queue)

    @staticmethod
    def _work(get: Callable[[], Optional[_QueuedCall]],
              free: Callable[[None], None]) -> None:
        while True:
            call = get()
            if call is None:
                return
            try:
                call.run()  # never raises (a task's failure is its TaskResult) ...
            except BaseException:  # ... but a worker must outlive a bug
                logger.exception("Executor: a worker thread failed to run a task")
            call = None  # drop the finished call while waiting for the next
            free(None)

    @staticmethod
    def _send_stops(queue: Any, threads: List[threading.Thread]) -> None:
        for _ in threads:
            queue.put(None)

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        """Stop the workers once the queued calls ran (cancel those first with
        ``cancel_futures``); ``wait`` joins the workers."""
        if cancel_futures:
            import queue

            while True:
                try:
                    call = self._queue.get_nowait()
                except queue.Empty:
                    break
                if call is not None:
                    call.cancel()
        self._release()  # the workers' ``None``s, once
        if wait:
            for thread in self._threads:
                thread.join()

    @classmethod
    def _join_at_exit(cls, thread: threading.Thread, queue: Any) -> None:
        with cls._exit_lock:
            if cls._exit_queues is None:
                import atexit

                cls._exit_queues = weakref.WeakKeyDictionary()
                atexit.register(cls._finish_at_exit)
            cls._exit_queues[thread] = queue

    @classmethod
    def _finish_at_exit(cls) -> None:
        with cls._exit_lock:
            cls._exited = True
            workers = list((cls._exit_queues or {}).items())
        for _, queue in workers:
            queue.put(None)
        for thread, _ in workers:
            thread.join()


_Handle = Union["Future[TaskResult]", _Job]  # a task's handle in the result table


class Executor:
    """Run callables in this process and collect their :class:`TaskResult`.

    ``mode`` picks how: :attr:`ExecutionMode.SEQUENTIAL` runs the function inline
    inside ``submit`` (the default), THREAD on a pool of ``max_workers`` threads,
    PROCESS on a pool of ``max_workers`` processes (the function, its arguments
    and its return value must pickle; define the function at module level).

    A task never raises out of the executor: exceptions (``BaseException``
    included, such as ``SystemExit`` or ``asyncio.CancelledError``), arguments
    that do not pickle and a crashed worker process all come back as a FAILED
    TaskResult with ``error_type`` set.  Only Ctrl-C and ``sys.exit()`` in a
    SEQUENTIAL task on the main thread propagate, as they should.

    Memory stays bounded: ``result(task_id)`` hands a result over exactly once
    and forgets it; at most ``max_results`` uncollected tasks are remembered,
    and beyond that the oldest one is dropped (its result is discarded,
    ``stats["dropped"]`` counts it and a warning is logged, at most once a
    minute).  Use :meth:`map`, or
    collect what you submit, and nothing accumulates.

    The pool starts on :meth:`start`, on entering ``with``, or lazily on the
    first ``submit``; :meth:`stop` shuts it down (a later ``submit`` starts a
    new pool).  ``mp_context`` (PROCESS mode) is passed to
    ``ProcessPoolExecutor`` to choose the start method.

    Code that waits on a task itself uses :meth:`submit_future` (a
    ``concurrent.futures.Future``, no task id to collect).

    THREAD mode runs on a small pool of its own (:class:`_ThreadPool`: named
    threads ``eventforge-executor_N``, lighter per task than
    ``ThreadPoolExecutor``); PROCESS mode on a ``ProcessPoolExecutor``.

    Locks, outermost first: ``_lock`` (the result table, the pool reference,
    the counters), then ``_ThreadPool._exit_lock`` (taken under it only when
    a THREAD worker starts; nothing is taken under that one).  A THREAD task
    is queued under ``_lock`` (the thread pool has no lock of its own); the
    process pool's own locks are taken outside it (``submit``, ``shutdown``),
    except while a new pool is being built.  A :class:`_Job`'s two raw locks
    are signals (a claim, "done"), never held while another lock is taken.
    """

    def __init__(
        self,
        mode: Union[ExecutionMode, str] = ExecutionMode.SEQUENTIAL,
        max_workers: int = 4,
        *,
        max_results: int = 100_000,
        mp_context: Optional[multiprocessing.context.BaseContext] = None,
    ) -> None:
        try:
            self.mode = ExecutionMode(mode)
        except ValueError:
            choices = ", ".join(m.value for m in ExecutionMode)
            raise ValueError(
                f"unknown execution mode {mode!r}; expected one of: {choices}"
            ) from None
        if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1:
            raise ValueError(f"max_workers must be an integer >= 1, not {max_workers!r}")
        if isinstance(max_results, bool) or not isinstance(max_results, int) or max_results < 1:
            raise ValueError(f"max_results must be an integer >= 1, not {max_results!r}")
        self.max_workers = max_workers
        self.max_results = max_results
        self._mp_context = mp_context
        self._pool: Optional[Union[_ThreadPool, concurrent.futures.ProcessPoolExecutor]] = None
        self._lock = threading.Lock()
        self._tasks: collections.OrderedDict[str, _Handle] = \
            collections.OrderedDict()
        self._prefix = f"task-{os.urandom(3).hex()}-"
        self._counter = itertools.count(1)
        self._submitted = 0
        self._dropped = 0
        self._drop_logged_at = -1e9  # monotonic time of the last drop warning
        self._pools_replaced = 0
        self._inline = self.mode is ExecutionMode.SEQUENTIAL
        self._in_process = self.mode is ExecutionMode.PROCESS
        self._threaded = self.mode is ExecutionMode.THREAD

    # -- life cycle -------------------------------------------------------

    @property
    def running(self) -> bool:
        """True while a pool is up (always False in SEQUENTIAL mode)."""
        return self._pool is not None

    def start(self) -> Executor:
        """Start the worker pool (idempotent; a no-op in SEQUENTIAL mode)."""
        if self.mode is not ExecutionMode.SEQUENTIAL:
            with self._lock:
                self._pool_locked()
        return self

    def _pool_locked(self) -> Union[_ThreadPool, concurrent.futures.ProcessPoolExecutor]:
        """The pool, built first if there is none (THREAD and PROCESS modes)."""
        pool = self._pool
        if pool is None:
            if self.mode is ExecutionMode.THREAD:
                pool = _ThreadPool(self.max_workers, "eventforge-executor")
            else:
                import concurrent.futures as cf

                pool = cf.ProcessPoolExecutor(
                    max_workers=self.max_workers, mp_context=self._mp_context
                )
            self._pool = pool
        return pool

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
        task_id = f"{self._prefix}{next(self._counter):x}"
        job: Optional[_Job] = None
        handle: _Handle
        if self._threaded:  # queued below, in the same lock round trip
            handle = job = _Job(task_id, func, args, kwargs)
        else:
            handle = self._start(task_id, func, args, kwargs)
        with self._lock:
            if job is not None:  # first: if it raises, nothing is tracked
                self._pool_locked().put(job)  # type: ignore[union-attr]
            self._submitted += 1
            tasks = self._tasks
            tasks[task_id] = handle
            if len(tasks) > self.max_results:
                self._drop_oldest_locked()
        return task_id

    def submit_future(self, func: Callable[..., Any], args: Iterable[Any] = (),
                      kwargs: Optional[Dict[str, Any]] = None) -> Future[TaskResult]:
        """Run ``func(*args, **kwargs)`` as :meth:`submit` does; return a Future instead.

        The hook for code that waits on the task itself (RPCServer, the
        dispatchers, tasks): nothing enters the result table (no id to
        collect, no ``max_results`` cap), only ``stats["submitted"]`` counts
        it.  The ``concurrent.futures.Future`` resolves to the task's
        :class:`TaskResult`; a failure of ``func`` is a FAILED TaskResult,
        not an exception.  In SEQUENTIAL mode the call runs here and the
        Future comes back already done (a callback added to it runs at once),
        so "done now" and "done later" are read the same way.  The Future
        itself is cancelled when ``stop(wait=False)`` drops the task before it
        starts, and in PROCESS mode it raises what kept the call from a worker
        (an argument that does not pickle, a broken pool).
        """
        if not callable(func):
            raise TypeError(f"submit_future() needs a callable, not {type(func).__name__}")
        task_id = f"{self._prefix}{next(self._counter):x}"
        future = self._start(task_id, func, args, {} if kwargs is None else kwargs, True)
        with self._lock:
            self._submitted += 1
        return future  # type: ignore[return-value]  # a Future, as asked

    def _drop_oldest_locked(self) -> None:
        old_id, _ = self._tasks.popitem(last=False)
        self._dropped += 1
        now = time.monotonic()
        if now - self._drop_logged_at < 60.0:  # one line a minute, never one per task
            return
        self._drop_logged_at = now
        logger.warning(
            "Executor: dropped the uncollected result of task %s (more than max_results=%d "
            "uncollected tasks; %d dropped so far, counted in stats); collect results with "
            "result() or use map()",
            old_id, self.max_results, self._dropped,
        )

    def _start(self, task_id: str, func: Callable[..., Any], args: Any,
               kwargs: Dict[str, Any], want_future: bool = False) -> _Handle:
        """Run the task here (SEQUENTIAL) or hand it to the pool; the task's handle.

        The handle is a Future, except in THREAD mode, where it is a lighter
        :class:`_Job` unless ``want_future`` asks for a Future.  A PROCESS pool
        found unusable is replaced once.
        """
        if self._inline:
            return _done_future(_run_task(task_id, func, args, kwargs))
        in_process = self._in_process
        if self._threaded:
            handle: _Handle
            if want_future:
                import concurrent.futures as cf

                handle = cf.Future()
                call: _QueuedCall = _FutureJob(handle, task_id, func, args, kwargs)
            else:
                handle = call = _Job(task_id, func, args, kwargs)
            with self._lock:  # see _ThreadPool: no put once stop() detached the pool
                self._pool_locked().put(call)  # type: ignore[union-attr]
            return handle
        pool = cast("Optional[concurrent.futures.ProcessPoolExecutor]", self._pool)
        if pool is None:
            with self._lock:
                pool = cast("concurrent.futures.ProcessPoolExecutor", self._pool_locked())
        try:
            return pool.submit(_run_task, task_id, func, args, kwargs, in_process)
        except RuntimeError as exc:
            # BrokenProcessPool (a RuntimeError), or a pool shut down by a
            # concurrent stop(): start a fresh pool.
            broken = None
            with self._lock:
                if self._pool is pool:
                    broken, self._pool = pool, None
                    self._pools_replaced += 1
                    logger.warning(
                        "Executor: replacing unusable %s pool (%s)", self.mode.value, exc
                    )
                fresh = cast("concurrent.futures.ProcessPoolExecutor", self._pool_locked())
            if broken is not None:
                broken.shutdown(wait=True)  # its workers are gone: releases its pipes
            return fresh.submit(_run_task, task_id, func, args, kwargs, in_process)

    def _lookup(self, task_id: str) -> _Handle:
        future = self._tasks.get(task_id)
        if future is None:
            raise TaskNotFoundError(
                f"unknown task id {task_id!r}: never submitted to this executor, "
                "already collected, or dropped by the max_results cap"
            )
        return future

    def result(self, task_id: str, timeout: Optional[float] = None) -> TaskResult:
        """Wait for a task and return its :class:`TaskResult` (once per task).

        ``timeout`` is in seconds (None waits for as long as it takes).  Past the
        deadline :class:`EventforgeTimeoutError` (a ``TimeoutError``) is raised
        and the task stays collectable.  An unknown or already-collected id
        raises :class:`TaskNotFoundError` at once.
        """
        timeout = _check_timeout(timeout)
        result = _task_result(task_id, self._lookup(task_id), timeout)
        if result is None:
            raise EventforgeTimeoutError(f"task {task_id} did not finish within {timeout} s")
        with self._lock:
            self._tasks.pop(task_id, None)
        return result

    def status(self, task_id: str) -> TaskStatus:
        """Return the current :class:`TaskStatus` of an uncollected task (no waiting)."""
        future = self._lookup(task_id)
        if future.running():
            return TaskStatus.RUNNING
        if not future.done():
            return TaskStatus.PENDING
        return _outcome(task_id, future).status

    def cancel(self, task_id: str) -> bool:
        """Cancel a task that has not started yet; True if it was cancelled."""
        return bool(self._lookup(task_id).cancel())

    def _submit_each(self, func: Callable[..., Any],
                     items: Iterable[Any]) -> List[Tuple[str, _Handle]]:
        """Submit ``func(item)`` for every item, without bookkeeping: (task id, Future)s."""
        prefix, counter, start = self._prefix, self._counter, self._start
        pending = []
        for item in items:
            task_id = f"{prefix}{next(counter):x}"
            pending.append((task_id, start(task_id, func, (item,), {})))
        with self._lock:
            self._submitted += len(pending)
        return pending

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
            out: List[TaskResult] = []
            for item in items:
                if deadline is not None and time.monotonic() > deadline:
                    raise EventforgeTimeoutError(
                        f"map() did not finish within {timeout} s ({len(out)} items done)"
                    )
                [(task_id, future)] = self._submit_each(func, (item,))
                out.append(_outcome(task_id, future))
            return out
        pending = self._submit_each(func, items)
        results: List[TaskResult] = []
        for task_id, future in pending:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            result = _task_result(task_id, future, remaining)
            if result is None:
                for _, f in pending:
                    f.cancel()
                done = sum(1 for _, g in pending if g.done() and not g.cancelled())
                raise EventforgeTimeoutError(
                    f"map() did not finish within {timeout} s "
                    f"({done} of {len(pending)} items done)"
                )
            results.append(result)
        return results

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
        future = self._lookup(task_id)
        if not await _wait_future_async(future, timeout):
            raise EventforgeTimeoutError(f"task {task_id} did not finish within {timeout} s")
        result = _outcome(task_id, future)
        with self._lock:
            self._tasks.pop(task_id, None)
        return result

    async def map_async(self, func: Callable[..., Any], items: Iterable[Any],
                        timeout: Optional[float] = None) -> List[TaskResult]:
        """Async :meth:`map`: results in input order, one overall exact timeout.

        If the deadline passes (or the coroutine is cancelled) the tasks not yet
        started are cancelled.
        """
        timeout = _check_timeout(timeout)
        if self.mode is ExecutionMode.SEQUENTIAL:
            return self.map(func, items, timeout)
        pending = self._submit_each(func, items)
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
                f"map_async() did not finish within {timeout} s "
                f"({done} of {len(futures)} items done)"
            )
        return [_outcome(tid, f) for tid, f in pending]

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


async def _wait_futures_async(futures: Sequence[_Handle], timeout: Optional[float]) -> bool:
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
    def expire() -> None:
        if not waiter.done():
            waiter.set_result(False)

    handle = loop.call_later(timeout, expire)
    try:
        return bool(await waiter)
    finally:
        handle.cancel()


async def _wait_future_async(future: _Handle, timeout: Optional[float]) -> bool:
    return await _wait_futures_async([future], timeout)


# ---------------------------------------------------------------------------
# 7. RPC
# ---------------------------------------------------------------------------

# Request/response payloads are those of eventforge 0.1, so either
# side can talk to the other (see docs/protocol.md, "RPC"):
#
#   request   topic  "<service>.request", reply_to "_rpc_reply.<id>"
#             payload {"id", "method", "args", "kwargs", "timeout"}
#   response  topic  the request's reply_to, correlation_id = request message id
#             payload {"id", "request_id", "result", "error", "error_type"}
#             (+ "traceback" when the server sends it; old peers ignore it)

RPC_REPLY_PREFIX = "_rpc_reply."

#: Attribute names an RPCClient never turns into remote methods, besides every
#: name starting with "_": probes made by IPython, pydoc and similar tools.
_NOT_REMOTE_NAMES = frozenset({"getdoc", "trait_names", "mro"})

_MAX_REMOTE_TRACEBACK = 16_384


#: Upper bounds (seconds) of the duration histograms kept by RPCServer (and
#: exported by Monitor): Prometheus-style cumulative buckets plus +Inf.
DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                    1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_MAX_ERROR_KINDS = 16  # distinct error types counted per method; the rest are "__other__"


class _Histogram:
    """Counts of durations in the fixed :data:`DURATION_BUCKETS`; its owner's lock guards it."""

    __slots__ = ("counts", "sum", "count")

    def __init__(self) -> None:
        self.counts = [0] * (len(DURATION_BUCKETS) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        import bisect

        self.counts[bisect.bisect_left(DURATION_BUCKETS, seconds)] += 1
        self.sum += seconds
        self.count += 1

    def snapshot(self) -> Dict[str, Any]:
        """``{"buckets": [[le, cumulative count], ..., ["+Inf", count]], "sum", "count"}``."""
        buckets: List[List[Any]] = []
        running = 0
        for bound, n in zip(DURATION_BUCKETS + ("+Inf",), self.counts):
            running += n
            buckets.append([bound, running])
        return {"buckets": buckets, "sum": self.sum, "count": self.count}


class _MethodCounts:
    """Per-method counters of an RPCServer (guarded by the server's lock)."""

    __slots__ = ("calls", "errors", "in_flight", "duration")

    def __init__(self) -> None:
        self.calls = 0
        self.errors: Dict[str, int] = {}
        self.in_flight = 0
        self.duration = _Histogram()

    def finish(self, seconds: float, error_type: Optional[str]) -> None:
        self.in_flight -= 1
        self.duration.observe(seconds)
        if error_type is not None:
            if error_type not in self.errors and len(self.errors) >= _MAX_ERROR_KINDS:
                error_type = "__other__"
            self.errors[error_type] = self.errors.get(error_type, 0) + 1

    def snapshot(self) -> Dict[str, Any]:
        return {"calls": self.calls, "errors": dict(self.errors),
                "error_total": sum(self.errors.values()), "in_flight": self.in_flight,
                "duration_seconds": self.duration.snapshot()}


def _request_topic(service_name: str) -> str:
    if not isinstance(service_name, str) or not service_name:
        raise ValueError(f"service_name must be a non-empty string, not {service_name!r}")
    try:
        return validate_topic(f"{service_name}.request")
    except TopicError as exc:
        raise TopicError(f"invalid service_name {service_name!r}: {exc}") from None


def _check_method_name(method: Any) -> str:
    if not isinstance(method, str) or not method:
        raise TypeError(f"method must be a non-empty name string, not {method!r}")
    return method


def _error_from_response(data: Dict[str, Any]) -> RemoteError:
    error_type = data.get("error_type") or "RemoteError"
    message = data.get("error")
    message = "" if message is None else str(message)
    tb = data.get("traceback")
    tb = tb if isinstance(tb, str) else None
    if error_type == "MethodNotFoundError" or message.startswith("Method not found"):
        return MethodNotFoundError(str(error_type), message, tb)
    return RemoteError(str(error_type), message, tb)


def _introspection_guard(owner: Any, name: str) -> None:
    if name.startswith("_") or name in _NOT_REMOTE_NAMES:
        raise AttributeError(f"{type(owner).__name__!r} object has no attribute {name!r}")


class RemoteMethod:
    """A remote method bound to a client: ``client.add`` in ``client.add(1, 2)``.

    Calling it is ``client.call(name, *args, **kwargs)``; ``call_async`` is
    the asyncio form.  Creating one sends nothing.
    """

    __slots__ = ("client", "name")

    def __init__(self, client: Any, name: str) -> None:
        self.client = client
        self.name = name

    @property
    def __name__(self) -> str:
        return self.name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.client.call(self.name, *args, **kwargs)

    async def call_async(self, *args: Any, **kwargs: Any) -> Any:
        """Await the remote call (see :meth:`RPCClient.call_async`)."""
        return await self.client.call_async(self.name, *args, **kwargs)

    def __repr__(self) -> str:
        return f"<RemoteMethod {self.name!r} of {self.client!r}>"


class _DynamicMethods:
    """``client.name(...)`` for any public name; introspection stays local.

    Names starting with ``_`` (dunders, ``_repr_html_``, ``_ipython_*`` ...)
    and a few well-known probes raise AttributeError instead of becoming
    remote calls, so ``hasattr``, ``copy``, ``pickle`` and IPython behave.
    """

    def __getattr__(self, name: str) -> RemoteMethod:
        _introspection_guard(self, name)
        return RemoteMethod(self, name)

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError(
            f"{type(self).__name__} objects cannot be pickled or copied: "
            "they hold a live queue; create one in each process"
        )


def _method_label(message: Message) -> str:
    """``method()`` of an RPC request, for error texts (``request`` if unknown)."""
    payload = message.payload
    method = payload.get("method") if isinstance(payload, dict) else None
    return f"{method}()" if isinstance(method, str) else "the request"


def _parse_request(message: Message) -> Tuple[str, str, Any, Any, Optional[str]]:
    """``(method, request id, args, kwargs, problem)`` of an RPC request.

    ``problem`` says what makes the request invalid (None when it is valid);
    the request id falls back to the message id.
    """
    payload = message.payload
    if not isinstance(payload, dict) or not isinstance(payload.get("method"), str):
        return "", message.id, None, None, \
            "an RPC request payload is an object with a string 'method'"
    request_id = payload.get("id")
    if not isinstance(request_id, str):
        request_id = message.id
    args = payload.get("args")
    kwargs = payload.get("kwargs")
    args = [] if args is None else args
    kwargs = {} if kwargs is None else kwargs
    if not isinstance(args, (list, tuple)) or not isinstance(kwargs, dict):
        return payload["method"], request_id, None, None, \
            "'args' must be a list and 'kwargs' an object"
    return payload["method"], request_id, args, kwargs, None


class RPCServer:
    """Serve registered functions by name over a :class:`MessageQueue`.

    Requests arrive on ``"<service_name>.request"``; each names a method,
    its ``args`` and ``kwargs``.  Only registered names can be called.  The
    return value (or the exception: its type name, message and traceback)
    goes back to the request's ``reply_to``.

    Without an ``executor`` a method runs inline, in the thread that
    delivers the request (the publisher's thread on a MemoryTransport, the
    connection's thread on TCP).  With an :class:`Executor` it really runs
    there: a THREAD executor lets a slow method proceed while other callers
    are served; a PROCESS executor needs module-level (picklable) methods.
    The server never stops an executor it was given.

    ``include_traceback=False`` keeps server tracebacks off the wire.

    Locks: one, ``_lock`` (``_idle`` is a Condition on it), never held while
    a method runs or a reply is sent; ``_stopped`` is an Event waited on
    outside it.
    """

    def __init__(
        self,
        queue: MessageQueue,
        executor: Optional[Executor] = None,
        service_name: str = "rpc",
        *,
        include_traceback: bool = True,
    ) -> None:
        if executor is not None and not isinstance(executor, Executor):
            raise TypeError(
                f"executor must be an eventforge Executor, not {type(executor).__name__}"
            )
        self.queue = queue
        self.executor = executor
        self.service_name = service_name
        self.request_topic = _request_topic(service_name)
        self.include_traceback = include_traceback
        self._methods: Dict[str, Callable[..., Any]] = {}
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._inflight = 0
        self._stoppers = 0  # threads waiting in stop() for _inflight to drop
        self._subscription: Optional[str] = None
        self._stopped = threading.Event()
        self._local = threading.local()
        self._counts = {"requests": 0, "succeeded": 0, "failed": 0, "not_found": 0,
                        "invalid": 0, "reply_errors": 0}
        self._per_method: Dict[str, _MethodCounts] = {}  # registered names only

    # -- registration ---------------------------------------------------------

    def register(self, name: Any = None) -> Any:
        """Decorator registering a function under ``name`` (default: its ``__name__``).

        ``@server.register()``, ``@server.register("name")`` and bare
        ``@server.register`` all work; the function is returned unchanged.
        """
        if callable(name):  # bare @server.register
            self.add_method(getattr(name, "__name__", ""), name)
            return name

        def decorator(func: Callable[..., Any]) -> Callable[..., Any]:
            self.add_method(name if name is not None else getattr(func, "__name__", ""), func)
            return func

        return decorator

    def add_method(self, name: str, func: Callable[..., Any]) -> None:
        """Register ``func`` (any callable) under ``name``; re-registering replaces it."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"method name must be a non-empty string, not {name!r}")
        if not callable(func):
            raise TypeError(f"method {name!r} must be callable, not {type(func).__name__}")
        if _is_async_callable(func):
            raise TypeError(
                f"method {name!r} is a coroutine function; register a plain function "
                "(the server runs methods in threads or processes)"
            )
        with self._lock:
            self._methods[name] = func

    def remove_method(self, name: str) -> bool:
        """Unregister ``name``; return False if it was not registered."""
        with self._lock:
            return self._methods.pop(name, None) is not None

    @property
    def methods(self) -> List[str]:
        """The registered method names, sorted."""
        with self._lock:
            return sorted(self._methods)

    # -- serving --------------------------------------------------------------

    @property
    def serving(self) -> bool:
        """True between :meth:`serve` and :meth:`stop`."""
        return self._subscription is not None

    def serve(self, blocking: bool = True) -> None:
        """Start answering requests.

        ``blocking=False`` subscribes and returns at once.  ``blocking=True``
        then waits until :meth:`stop` is called (from another thread or a
        signal handler) or Ctrl-C is pressed, and returns normally.
        """
        with self._lock:
            if self._subscription is None:
                self._stopped.clear()
                self._subscription = self.queue.subscribe(self.request_topic, self._on_request)
        if not blocking:
            return
        try:
            while not self._stopped.wait(0.5):
                pass
        except KeyboardInterrupt:
            self.stop()

    def stop(self, timeout: Optional[float] = 30.0) -> None:
        """Stop taking requests and wait up to ``timeout`` s for calls in flight.

        Every request already received is still run and answered: calls in
        flight, and requests the transport had read but not yet handed over
        (a TCP connection's queued requests; they may finish after ``stop``
        returns, and closing the transport waits for them).  Called from
        inside a method, it does not wait for that call.
        """
        with self._lock:
            sub, self._subscription = self._subscription, None
        if sub is not None:
            try:
                self.queue.unsubscribe(sub)
            except Exception as exc:  # the transport may already be closed
                logger.debug("RPCServer %s: unsubscribe failed: %s", self.service_name, exc)
        own = 1 if getattr(self._local, "depth", 0) else 0
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._idle:
            self._stoppers += 1
            try:
                while self._inflight > own:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        logger.warning("RPCServer %s stopped with %d call(s) still running",
                                       self.service_name, self._inflight - own)
                        break
                    self._idle.wait(remaining)
            finally:
                self._stoppers -= 1
        self._stopped.set()

    def __enter__(self) -> RPCServer:
        self.serve(blocking=False)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    @property
    def stats(self) -> Dict[str, int]:
        """Counters: requests, succeeded, failed, not_found, invalid, reply_errors, in_flight."""
        with self._lock:
            out = dict(self._counts)
            out["in_flight"] = self._inflight
            return out

    def method_stats(self) -> Dict[str, Dict[str, Any]]:
        """Per registered method: calls, errors by type, in_flight, duration histogram.

        Every registered method is listed, with zeros until it is called.
        Durations run from the request's arrival to its outcome (queueing
        in the executor included); see :data:`DURATION_BUCKETS`.
        """
        with self._lock:
            names = set(self._methods) | set(self._per_method)
            return {name: (self._per_method.get(name) or _MethodCounts()).snapshot()
                    for name in sorted(names)}

    def _count(self, key: str, call: Optional[Tuple[str, float]] = None,
               error_type: Optional[str] = None) -> None:
        with self._lock:
            self._counts[key] += 1
            if call is not None:
                self._per_method[call[0]].finish(_perf_counter() - call[1], error_type)

    # -- handling one request -------------------------------------------------

    def _on_request(self, message: Message) -> None:
        name, request_id, args, kwargs, problem = _parse_request(message)
        func = None if problem is not None else self._methods.get(name)
        with self._lock:  # one lock round for every count a request starts with
            self._counts["requests"] += 1
            self._inflight += 1
            if func is not None:
                counts = self._per_method.get(name)
                if counts is None:
                    counts = self._per_method[name] = _MethodCounts()
                counts.calls += 1
                counts.in_flight += 1
        if problem is not None:
            self._reject(message, "InvalidRequest", problem, request_id)
            return
        if func is None:
            self._count("not_found")
            self._respond(message, request_id, None,
                          ("MethodNotFoundError", f"Method not found: {name}", None))
            return
        call = (name, _perf_counter())
        if self.executor is None:  # inline, on this (the delivering) thread
            local = self._local
            local.depth = getattr(local, "depth", 0) + 1
            try:
                value = func(*args, **kwargs)
            except BaseException as exc:  # any failure is that call's only
                self._respond_task(message, request_id, _failure(request_id, exc), call=call)
                _reraise_interrupt(exc)  # Ctrl-C on the main thread: after the reply
            else:
                self._respond(message, request_id, value, None, outcome="succeeded", call=call)
            finally:
                local.depth -= 1
            return
        try:
            if self.executor.mode is ExecutionMode.PROCESS:  # the server itself cannot pickle
                future = self.executor.submit_future(func, tuple(args), kwargs)
            else:
                future = self.executor.submit_future(self._call_marked, (func, args, kwargs))
        except BaseException as exc:  # e.g. the executor refused the call
            with self._lock:
                self._per_method[name].finish(_perf_counter() - call[1], type(exc).__name__)
            self._finish()
            raise
        # Runs at once when the call is already done (a SEQUENTIAL executor).
        future.add_done_callback(
            lambda fut: self._respond_task(message, request_id, _outcome(request_id, fut),
                                           finish=True, call=call))

    # Requests matched before stop() unsubscribed are still answered.
    setattr(_on_request, _FINISH_QUEUED, True)

    def _call_marked(self, func: Callable[..., Any], args: Any, kwargs: Dict[str, Any]) -> Any:
        # Runs on an executor thread: lets stop() called by the method not wait for itself.
        self._local.depth = getattr(self._local, "depth", 0) + 1
        try:
            return func(*args, **kwargs)
        finally:
            self._local.depth -= 1

    def _finish(self) -> None:
        with self._idle:
            self._inflight -= 1
            if self._stoppers:  # each re-checks its own bound (a stop() from a method waits for 1)
                self._idle.notify_all()

    def _reject(self, message: Message, error_type: str, text: str, request_id: str) -> None:
        self._count("invalid")
        logger.warning("RPCServer %s: invalid request %s: %s", self.service_name, message.id, text)
        self._respond(message, request_id, None,
                      (error_type, f"invalid request: {text}", None), finish=True)

    def _respond_task(self, message: Message, request_id: str, result: TaskResult,
                      finish: bool = True, call: Optional[Tuple[str, float]] = None) -> None:
        if result.status is TaskStatus.COMPLETED:
            self._respond(message, request_id, result.value, None, finish, "succeeded", call)
        else:
            tb = result.traceback if self.include_traceback else None
            if tb and len(tb) > _MAX_REMOTE_TRACEBACK:
                tb = "...\n" + tb[-_MAX_REMOTE_TRACEBACK:]
            self._respond(message, request_id, None,
                          (result.error_type or "Error", result.error or "", tb), finish, "failed",
                          call)

    def _respond(self, message: Message, request_id: str, value: Any,
                 error: Optional[Tuple[str, str, Optional[str]]], finish: bool = True,
                 outcome: Optional[str] = None, call: Optional[Tuple[str, float]] = None) -> None:
        if outcome is not None:
            # Counted before the reply leaves: a caller that has its result
            # must find the call counted in stats.
            self._count(outcome, call, error[0] if error is not None else None)
        try:
            if not message.reply_to:
                if error is not None:
                    logger.warning(
                        "RPCServer %s: call %s failed with no reply_to to report to: %s: %s",
                        self.service_name, request_id, error[0], error[1])
                return
            payload: Dict[str, Any] = {"id": new_id(), "request_id": request_id, "result": value,
                                       "error": None, "error_type": None}
            if error is not None:
                payload["error_type"], payload["error"] = error[0], error[1]
                if error[2]:
                    payload["traceback"] = error[2]
            reply = _make_message(message.reply_to, payload, {}, None, message.id)
            try:
                self.queue.send(reply)
            except (SerializationError, FrameTooLargeError) as exc:
                # The reply cannot cross this transport: tell the caller why, at
                # once, rather than let it wait for a timeout (and retry).
                self._count("reply_errors")
                reply.payload = {"id": payload["id"], "request_id": request_id, "result": None,
                                 "error_type": type(exc).__name__,
                                 "error": f"the reply to {_method_label(message)} cannot be "
                                          f"sent: {exc}"}
                self.queue.send(reply)
        except Exception as exc:
            self._count("reply_errors")
            logger.warning("RPCServer %s: could not send the reply to %s: %s",
                           self.service_name, message.reply_to, exc)
        finally:
            if finish:
                self._finish()

    def __repr__(self) -> str:
        state = "serving" if self.serving else "stopped"
        return f"<RPCServer {self.service_name!r} {state}, {len(self._methods)} methods>"


class RPCClient(_DynamicMethods):
    """Call methods of an :class:`RPCServer` by name.

    ``client.call("add", 1, 2)`` and ``client.add(1, 2)`` are the same call.
    ``timeout`` (seconds, None for no limit) is the default per call;
    ``call(..., timeout=5)`` overrides it.  To pass a keyword argument that is
    itself called ``timeout``, use :meth:`invoke`.

    Errors: a remote exception raises :class:`RemoteError` (``str()`` reads
    ``"ValueError: boom"``, the remote traceback is attached); an unknown name
    raises :class:`MethodNotFoundError`; no reply in time raises
    :class:`RPCTimeoutError` (a ``TimeoutError``).  A reply arriving after its
    timeout is dropped by the transport: nothing accumulates.
    """

    def __init__(self, queue: MessageQueue, service_name: str = "rpc",
                 timeout: Optional[float] = 30.0) -> None:
        self.queue = queue
        self.service_name = service_name
        self.request_topic = _request_topic(service_name)
        self.timeout = _check_timeout(timeout)

    def _prepare(self, method: str, args: Any, kwargs: Any,
                 timeout: Optional[float]) -> Tuple[Message, Inbox, Optional[float]]:
        _check_method_name(method)
        wait = self.timeout if timeout is None else _check_timeout(timeout)
        request_id = new_id()
        payload = {"id": request_id, "method": method,
                   "args": [] if args is None else list(args),
                   "kwargs": {} if kwargs is None else dict(kwargs), "timeout": wait}
        headers: Dict[str, Any] = {}
        _set_ttl(headers, wait)
        message = _make_message(self.request_topic, payload, headers, RPC_REPLY_PREFIX + request_id)
        inbox = self.queue.transport.open_inbox(message.reply_to)  # type: ignore[arg-type]
        return message, inbox, wait

    def _unpack(self, method: str, reply: Optional[Message], inbox: Inbox,
                wait: Optional[float]) -> Any:
        if reply is None:
            if inbox.closed:
                raise TransportClosedError(
                    f"the transport closed while {self.service_name}.{method} "
                    "was waiting for its reply"
                )
            raise RPCTimeoutError(
                f"no reply from service {self.service_name!r} to {method}() within {wait} s"
            )
        data = reply.payload
        if not isinstance(data, dict):
            raise RemoteError("InvalidResponse", f"malformed RPC response: {data!r:.200}")
        if data.get("error") is None and data.get("error_type") is None:
            return data.get("result")
        raise _error_from_response(data)

    def invoke(self, method: str, args: Optional[Iterable[Any]] = None,
               kwargs: Optional[Dict[str, Any]] = None, *, timeout: Optional[float] = None) -> Any:
        """Call ``method`` with explicit ``args``/``kwargs`` (any keyword names)."""
        message, inbox, wait = self._prepare(method, args, kwargs, timeout)
        try:
            self.queue.send(message)
            return self._unpack(method, inbox.get(wait), inbox, wait)
        finally:
            inbox.close()

    def call(self, method: str, *args: Any, timeout: Optional[float] = None, **kwargs: Any) -> Any:
        """Call the remote ``method`` and return its result (see the class doc for errors)."""
        return self.invoke(method, args, kwargs, timeout=timeout)

    async def invoke_async(self, method: str, args: Optional[Iterable[Any]] = None,
                           kwargs: Optional[Dict[str, Any]] = None, *,
                           timeout: Optional[float] = None) -> Any:
        """Asyncio-native :meth:`invoke`."""
        message, inbox, wait = self._prepare(method, args, kwargs, timeout)
        try:
            self.queue.send(message)
            return self._unpack(method, await inbox.get_async(wait), inbox, wait)
        finally:
            inbox.close()

    async def call_async(self, method: str, *args: Any, timeout: Optional[float] = None,
                         **kwargs: Any) -> Any:
        """Asyncio-native :meth:`call`: waits without blocking the event loop.

        The timeout is exact; cancelling the awaiting task withdraws the
        reply inbox (a late reply is dropped).
        """
        return await self.invoke_async(method, args, kwargs, timeout=timeout)

    def __repr__(self) -> str:
        return f"<RPCClient {self.service_name!r} on {self.queue.transport!r}>"


def _require_call(client: Any) -> Any:
    if not callable(getattr(client, "call", None)):
        raise TypeError(f"{client!r} has no call() method")
    return client


async def _call_async_of(client: Any, method: str, args: Tuple[Any, ...],
                         kwargs: Dict[str, Any]) -> Any:
    call_async = getattr(client, "call_async", None)
    if call_async is not None:
        return await call_async(method, *args, **kwargs)
    import asyncio
    import functools

    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, functools.partial(client.call, method, *args, **kwargs))


class RoundRobinRPCClient(_DynamicMethods):
    """Spread calls over several clients in turn (client-side load balancing).

    Takes any objects with a ``call(method, *args, **kwargs)`` method,
    typically one :class:`RPCClient` per worker.  It has the same ``call``,
    ``call_async`` and dynamic-attribute surface; arguments (``timeout=``
    included) pass through unchanged.  Thread-safe.
    """

    def __init__(self, clients: Iterable[Any]) -> None:
        pool = tuple(_require_call(c) for c in clients)
        if not pool:
            raise ValueError("RoundRobinRPCClient needs at least one client")
        self.clients: Tuple[Any, ...] = pool
        self._turn = itertools.count()

    def next_client(self) -> Any:
        """Return the client whose turn it is (and advance the turn)."""
        return self.clients[next(self._turn) % len(self.clients)]

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call ``method`` on the next client in turn."""
        return self.next_client().call(method, *args, **kwargs)

    async def call_async(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Asyncio form of :meth:`call` (a client without ``call_async`` runs in a thread)."""
        return await _call_async_of(self.next_client(), method, args, kwargs)

    def __len__(self) -> int:
        return len(self.clients)

    def __repr__(self) -> str:
        return f"<RoundRobinRPCClient over {len(self.clients)} clients>"


class RetryingRPCClient(_DynamicMethods):
    """A client wrapper that retries failed calls; built by :func:`with_retry`."""

    def __init__(
        self,
        client: Any,
        max_retries: int = 3,
        backoff_initial: float = 0.1,
        backoff_factor: float = 2.0,
        retry_on: Any = (TimeoutError, ConnectionError),
        *,
        backoff_max: float = 10.0,
        jitter: float = 0.1,
        on_retry: Optional[Callable[[int, BaseException, float], Any]] = None,
    ) -> None:
        self.client = _require_call(client)
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"max_retries must be an integer >= 0, not {max_retries!r}")
        for label, value, low in (("backoff_initial", backoff_initial, 0.0),
                                  ("backoff_factor", backoff_factor, 1.0),
                                  ("backoff_max", backoff_max, 0.0)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= low:
                raise ValueError(f"{label} must be a number >= {low}, not {value!r}")
        if isinstance(jitter, bool) or not isinstance(jitter, (int, float)) or not 0 <= jitter <= 1:
            raise ValueError(f"jitter must be a fraction between 0 and 1, not {jitter!r}")
        if isinstance(retry_on, type):
            retry_on = (retry_on,)
        retry_on = tuple(retry_on)
        if not all(isinstance(t, type) and issubclass(t, BaseException) for t in retry_on):
            raise TypeError(f"retry_on must be exception classes, not {retry_on!r}")
        self.max_retries = max_retries
        self.backoff_initial = float(backoff_initial)
        self.backoff_factor = float(backoff_factor)
        self.backoff_max = float(backoff_max)
        self.jitter = float(jitter)
        self.retry_on: Tuple[type, ...] = retry_on
        self.on_retry = on_retry
        self._retries = _Counter()

    @property
    def retries(self) -> int:
        """How many retries this wrapper has made (all threads together); assignable."""
        return self._retries.value

    @retries.setter
    def retries(self, value: int) -> None:  # e.g. ``client.retries = 0`` to start counting afresh
        self._retries = _Counter(value)

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (0-based).

        ``backoff_initial * backoff_factor ** attempt``, capped at
        ``backoff_max``, then reduced by a random fraction of up to ``jitter``
        (so it never exceeds the cap and concurrent callers spread out).
        """
        import random

        try:
            base = self.backoff_initial * self.backoff_factor ** attempt
        except OverflowError:
            base = self.backoff_max
        base = min(base, self.backoff_max)
        return base * (1.0 - self.jitter * random.random())

    def _retrying(self, attempt: int, exc: BaseException, method: str) -> Optional[float]:
        if not isinstance(exc, self.retry_on) or attempt >= self.max_retries:
            return None
        wait = self.delay(attempt)
        self._retries.add()
        logger.info("retrying %s() in %.3f s after %s: %s (retry %d of %d)",
                    method, wait, type(exc).__name__, exc, attempt + 1, self.max_retries)
        if self.on_retry is not None:
            self.on_retry(attempt + 1, exc, wait)
        return wait

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call through the wrapped client, retrying on ``retry_on`` errors.

        After ``max_retries`` retries the last error is raised.  Note that a
        timed-out call may have run on the server: retry idempotent methods.
        """
        attempt = 0
        while True:
            try:
                return self.client.call(method, *args, **kwargs)
            except Exception as exc:
                wait = self._retrying(attempt, exc, method)
                if wait is None:
                    raise
            time.sleep(wait)
            attempt += 1

    async def call_async(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Asyncio form of :meth:`call` (waits with ``asyncio.sleep``)."""
        import asyncio

        attempt = 0
        while True:
            try:
                return await _call_async_of(self.client, method, args, kwargs)
            except Exception as exc:
                wait = self._retrying(attempt, exc, method)
                if wait is None:
                    raise
            await asyncio.sleep(wait)
            attempt += 1

    def __repr__(self) -> str:
        return f"<RetryingRPCClient max_retries={self.max_retries} around {self.client!r}>"


def with_retry(
    client: Any,
    max_retries: int = 3,
    backoff_initial: float = 0.1,
    backoff_factor: float = 2.0,
    retry_on: Any = (TimeoutError, ConnectionError),
    *,
    backoff_max: float = 10.0,
    jitter: float = 0.1,
    on_retry: Optional[Callable[[int, BaseException, float], Any]] = None,
) -> RetryingRPCClient:
    """Wrap ``client`` (anything with ``call``) so failed calls are retried.

    A call failing with one of ``retry_on`` (default: timeouts and lost
    connections; a :class:`RemoteError` is not retried) is tried again after
    ``backoff_initial * backoff_factor ** n`` seconds, capped at
    ``backoff_max`` and shortened by up to ``jitter`` (a fraction) at random,
    at most ``max_retries`` times.  ``on_retry(retry_number, error, delay)``
    is called before each wait.  Wrapping a :class:`RoundRobinRPCClient`
    sends each retry to the next worker.
    """
    return RetryingRPCClient(client, max_retries, backoff_initial, backoff_factor, retry_on,
                             backoff_max=backoff_max, jitter=jitter, on_retry=on_retry)


# -- records of eventforge 0.1's ``eventforge.types`` ----------------------------
# Plain __slots__ classes with the pydantic-style helpers Message has.  The
# RPC payloads above carry the same fields as RPCRequest/RPCResponse.


class _Record:
    """Shared behaviour of the small record types: dump, validate, compare, repr."""

    __slots__: Tuple[str, ...] = ()

    def model_dump(self, *, mode: str = "python") -> Dict[str, Any]:
        """The fields as a dict (``mode`` is accepted for pydantic compatibility)."""
        out = {name: getattr(self, name) for name in self.__slots__}
        if mode == "json" and "args" in out:
            out["args"] = list(out["args"])
        return out

    def model_dump_json(self) -> str:
        """The fields as JSON text."""
        return _dumps(self.model_dump(mode="json"))

    @classmethod
    def model_validate(cls, obj: Any) -> Any:
        """Build one from a dict of fields (or return an instance as is)."""
        if isinstance(obj, cls):
            return obj
        if not isinstance(obj, dict):
            raise TypeError(f"{cls.__name__}.model_validate() needs a dict, not "
                            f"{type(obj).__name__}")
        unknown = set(obj) - set(cls.__slots__)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s): {', '.join(sorted(unknown))}")
        return cls(**obj)

    @classmethod
    def model_validate_json(cls, data: Any) -> Any:
        """Build one from JSON text (str or bytes)."""
        return cls.model_validate(json.loads(data))

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self.model_dump() == other.model_dump()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r:.200}" for name in self.__slots__)
        return f"{type(self).__name__}({fields})"


class TaskRequest(_Record):
    """A request to run the function named ``func_name`` with ``args``/``kwargs``."""

    __slots__ = ("func_name", "args", "kwargs")

    def __init__(self, func_name: str, args: Iterable[Any] = (),
                 kwargs: Optional[Dict[str, Any]] = None) -> None:
        self.func_name = func_name
        self.args = tuple(args)
        self.kwargs = dict(kwargs) if kwargs else {}


class RPCRequest(_Record):
    """An RPC call: ``method`` with ``args``/``kwargs``; ``id`` is generated when omitted."""

    __slots__ = ("method", "args", "kwargs", "id")

    def __init__(self, method: str, args: Iterable[Any] = (),
                 kwargs: Optional[Dict[str, Any]] = None,
                 id: Optional[str] = None) -> None:  # noqa: A002 - the field is "id"
        self.method = method
        self.args = tuple(args)
        self.kwargs = dict(kwargs) if kwargs else {}
        self.id = id if id is not None else new_id()


class RPCResponse(_Record):
    """The answer to an RPC call: ``result``, or ``error`` and ``error_type``."""

    __slots__ = ("id", "request_id", "result", "error", "error_type")

    def __init__(self, id: str, request_id: str, result: Any = None,  # noqa: A002
                 error: Optional[str] = None, error_type: Optional[str] = None) -> None:
        self.id = id
        self.request_id = request_id
        self.result = result
        self.error = error
        self.error_type = error_type

    @property
    def is_error(self) -> bool:
        """True when the call failed."""
        return self.error is not None or self.error_type is not None


# ---------------------------------------------------------------------------
# 8. Observers
# ---------------------------------------------------------------------------

# An observer measures or reports work without being part of it.  The
# contract is duck-typed: any object may define some of
#
#     on_start(ctx)  on_success(ctx)  on_failure(ctx)  on_complete(ctx)
#
# each taking the TaskContext of one call.  A task calls them in that order
# (success or failure, then complete, which always fires), observers before
# the user's callbacks.  Meters implement all four.
#
# Underneath are two small event primitives: Eventful (one event, a list of
# subscribers, a pluggable Dispatcher) and Observable (named events declared
# in EVENTS).  A Reporter's @observe(TargetClass, "event") methods receive an
# event from every instance of TargetClass and its subclasses.


def _report_error(what: str, exc: BaseException) -> None:
    """Report an error that cannot be raised to a caller (the core's visible path).

    An observer hook failing after the task finished, a subscriber failing on
    a pool thread, a result that could not be published: logged when the
    application configured logging, else printed to stderr.
    """
    _report_unhandled(f"{what}: {type(exc).__name__}: {exc}", exc)


class ExecutionContext:
    """Timing and scratch space of one execution (the base of :class:`TaskContext`).

    ``start_time``/``end_time`` are wall-clock epoch seconds (for display);
    :attr:`execution_time` is measured on the monotonic clock and is never
    negative.  ``metadata`` is a dict for observers and callbacks to keep
    per-call data in (meters key their readings by themselves).  The id and
    the dict are made when first read: most calls never need them.
    """

    __slots__ = ("_id", "start_time", "end_time", "_metadata", "_t0", "_elapsed")

    def __init__(self, execution_id: Optional[str] = None,
                 metadata: Optional[Dict[Any, Any]] = None) -> None:
        self._id = execution_id
        self.start_time = _now()
        self.end_time: Optional[float] = None
        self._metadata = metadata
        self._t0 = _perf_counter()
        self._elapsed: Optional[float] = None

    @property
    def execution_id(self) -> str:
        """Unique id of this execution."""
        if self._id is None:
            self._id = _id_template % next(_ids)
        return self._id

    @property
    def metadata(self) -> Dict[Any, Any]:
        """A dict for per-call data of observers and callbacks."""
        if self._metadata is None:
            self._metadata = {}
        return self._metadata

    def restart_clock(self) -> None:
        """Start the monotonic clock now (the task does this right before the body)."""
        self._t0 = _perf_counter()

    def stop_clock(self) -> float:
        """Stop the clock: fix ``end_time`` and :attr:`execution_time`; returns the latter."""
        elapsed = _perf_counter() - self._t0
        self._elapsed = elapsed if elapsed > 0.0 else 0.0
        self.end_time = _now()
        return self._elapsed

    @property
    def execution_time(self) -> float:
        """Seconds elapsed (monotonic clock; never negative; still running: so far)."""
        if self._elapsed is not None:
            return self._elapsed
        elapsed = _perf_counter() - self._t0
        return elapsed if elapsed > 0.0 else 0.0


class TaskContext(ExecutionContext):
    """What observers and callbacks learn about one task call.

    Attributes:
        task_name: the task's name (the function's ``__name__``).
        task_id: unique id of this call (also in the published result; the
            same as ``execution_id``).
        args, kwargs: the call's arguments.
        result: the return value (None until it succeeded).
        error: the exception raised (None unless it failed).
        error_type: the exception's class name (None unless it failed).
        trigger: ``"call"`` for a direct call, ``"queue"`` for a run
            triggered by a message (``message`` is then that Message).
        state: the task's :class:`SharedState`.
        start_time, end_time, execution_time, metadata: see ExecutionContext.
    """

    __slots__ = ("task_name", "args", "kwargs", "result", "error", "error_type",
                 "trigger", "message", "state")

    def __init__(self, task_name: str, task_id: Optional[str] = None,
                 args: Tuple[Any, ...] = (), kwargs: Optional[Dict[str, Any]] = None,
                 trigger: str = "call", message: Optional[Message] = None,
                 state: Optional[SharedState] = None) -> None:
        # The base fields are set here rather than through ExecutionContext's
        # __init__: one Python frame less on every task call.
        self._id = task_id
        self.start_time = _now()
        self.end_time = None
        self._metadata = None
        self._elapsed = None
        self.task_name = task_name
        self.args = args
        self.kwargs = {} if kwargs is None else kwargs
        self.result: Any = None
        self.error: Optional[BaseException] = None
        self.error_type: Optional[str] = None
        self.trigger = trigger
        self.message = message
        self.state = state
        self._t0 = _perf_counter()

    task_id = ExecutionContext.execution_id

    @property
    def succeeded(self) -> bool:
        """True once the call finished without an error."""
        return self.error is None and self._elapsed is not None

    def __repr__(self) -> str:
        outcome = (f"error={self.error_type}" if self.error is not None
                   else f"result={self.result!r:.80}")
        return (f"<TaskContext {self.task_name} {self.task_id} {outcome} "
                f"execution_time={self.execution_time:.6f}>")


class SharedState:
    """A thread-safe dict shared by every call of one task (``my_task.state``).

    Each method takes one lock, so single operations are atomic;
    :meth:`update` with a function is an atomic read-modify-write
    (``state.update("calls", lambda n: n + 1, 0)``).
    """

    def __init__(self, initial: Optional[Dict[str, Any]] = None) -> None:
        self._lock = threading.RLock()
        self._data: Dict[Any, Any] = dict(initial or {})

    def get(self, key: Any, default: Any = None) -> Any:
        """Return the value of ``key`` or ``default``."""
        with self._lock:
            return self._data.get(key, default)

    def set(self, key: Any, value: Any) -> None:
        """Set ``key`` to ``value``."""
        with self._lock:
            self._data[key] = value

    def update(self, key: Any = None, func: Optional[Callable[[Any], Any]] = None,
               default: Any = None, **values: Any) -> Any:
        """Atomically change the state; two forms.

        ``update(key, func, default=None)`` stores ``func(current)`` (current
        is ``default`` when the key is missing) and returns the new value.
        ``update(mapping)`` / ``update(a=1, b=2)`` merges values like
        ``dict.update`` and returns None.
        """
        with self._lock:
            if func is not None:
                new = func(self._data.get(key, default))
                self._data[key] = new
                return new
            if key is not None:
                self._data.update(key)
            self._data.update(values)
            return None

    def delete(self, key: Any) -> bool:
        """Remove ``key``; return False if it was not there."""
        with self._lock:
            return self._data.pop(key, _MISSING) is not _MISSING

    def clear(self) -> None:
        """Remove every key."""
        with self._lock:
            self._data.clear()

    def items(self) -> List[Tuple[Any, Any]]:
        """A snapshot list of ``(key, value)`` pairs."""
        with self._lock:
            return list(self._data.items())

    def contains(self, key: Any) -> bool:
        """True if ``key`` is set (``key in state`` works too)."""
        with self._lock:
            return key in self._data

    __contains__ = contains

    def __getitem__(self, key: Any) -> Any:
        with self._lock:
            return self._data[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        self.set(key, value)

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)

    def __repr__(self) -> str:
        return f"SharedState({dict(self.items())!r})"


_MISSING = object()


# -- dispatchers ---------------------------------------------------------------
# A dispatcher decides how one firing reaches a tuple of subscribers:
# dispatch(subscribers, *args, **kwargs) -> whatever suits that policy.


class Dispatcher(abc.ABC):
    """How an event reaches its subscribers (see the four implementations)."""

    @abc.abstractmethod
    def dispatch(self, subscribers: Tuple[Callable[..., Any], ...],
                 *args: Any, **kwargs: Any) -> Any:
        """Deliver one firing to ``subscribers``."""


class BroadcastDispatcher(Dispatcher):
    """Call every subscriber in subscription order; return their results as a list.

    The first exception propagates to the firing code; the subscribers
    before the failing one have run, the ones after it have not.
    """

    def dispatch(self, subscribers: Tuple[Callable[..., Any], ...],
                 *args: Any, **kwargs: Any) -> List[Any]:
        return [fn(*args, **kwargs) for fn in subscribers]


class RoundRobinDispatcher(Dispatcher):
    """Give each firing to one subscriber, in turn; return its result (None if none).

    The rotation is stable when members change: it continues after the
    subscriber served last, so adding a member does not restart the turn and
    removing one does not skip the next.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: Any = _MISSING
        self._position = -1

    def dispatch(self, subscribers: Tuple[Callable[..., Any], ...],
                 *args: Any, **kwargs: Any) -> Any:
        if not subscribers:
            return None
        with self._lock:
            chosen = self._next_index(subscribers)
            self._last, self._position = subscribers[chosen], chosen
        return subscribers[chosen](*args, **kwargs)

    def _next_index(self, subscribers: Tuple[Callable[..., Any], ...]) -> int:
        last = self._last
        for index, fn in enumerate(subscribers):
            if fn is last:
                return (index + 1) % len(subscribers)
        # The last one served left: its successor moved into its position.
        return max(self._position, 0) % len(subscribers)


class ConcurrentDispatcher(Dispatcher):
    """Run every subscriber on an executor; return one Future per subscriber.

    ``executor`` is an eventforge :class:`Executor` or any
    ``concurrent.futures`` executor.  Each Future resolves to the
    subscriber's return value or raises its exception; a subscriber that
    fails is also logged (nobody may be holding its Future).
    """

    def __init__(self, executor: Any) -> None:
        if not callable(getattr(executor, "submit", None)):
            raise TypeError(f"executor must have a submit() method, not {executor!r}")
        self.executor = executor

    def dispatch(self, subscribers: Tuple[Callable[..., Any], ...],
                 *args: Any, **kwargs: Any) -> List[Any]:
        return [self._submit(fn, args, kwargs) for fn in subscribers]

    def _submit(self, fn: Callable[..., Any], args: Tuple[Any, ...],
                kwargs: Dict[str, Any]) -> Any:
        import concurrent.futures as cf

        if not isinstance(self.executor, Executor):
            future = self.executor.submit(fn, *args, **kwargs)
            future.add_done_callback(lambda f: self._log_failure(fn, f))
            return future
        out: Any = cf.Future()
        future = self.executor.submit_future(fn, args, kwargs)

        def settle(result: TaskResult) -> None:
            if result.is_success:
                out.set_result(result.value)
            else:
                exc = result.exception or RemoteError(
                    result.error_type or "Error", result.error or "", result.traceback)
                out.set_exception(exc)
                self._log_failure(fn, out)

        future.add_done_callback(lambda f: settle(_outcome("dispatch", f)))
        return out

    @staticmethod
    def _log_failure(fn: Callable[..., Any], future: Any) -> None:
        if future.cancelled():
            return
        exc = future.exception()
        if exc is not None:
            _report_error(f"subscriber {_callable_name(fn)} failed", exc)


class Node:
    """A worker with a capacity, routed to by :class:`LeastLoadedDispatcher`.

    Capacity is ``gpus`` when there are any, else ``max(cpus // 4, 1)``
    concurrent calls.  :meth:`try_acquire` reserves a slot (atomically; False
    when full) and :meth:`release` frees one (never below zero).  Calling the
    node calls ``handler`` and counts the call in :meth:`load` while it runs
    (a direct call is counted, not refused: use try_acquire to respect the
    capacity).
    """

    def __init__(self, name: str, cpus: int = 4, memory_gb: float = 0.0, gpus: int = 0,
                 handler: Optional[Callable[..., Any]] = None) -> None:
        for label, value in (("cpus", cpus), ("gpus", gpus)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{label} must be an integer >= 0, not {value!r}")
        self.name = name
        self.cpus = cpus
        self.memory_gb = memory_gb
        self.gpus = gpus
        self.handler = handler
        self.capacity = gpus if gpus > 0 else max(cpus // 4, 1)
        self.active = 0
        self._lock = threading.Lock()

    def load(self) -> float:
        """Calls in progress divided by the capacity (1.0 is full)."""
        return self.active / self.capacity

    def try_acquire(self) -> bool:
        """Reserve one slot if the node is not full; True if reserved."""
        with self._lock:
            if self.active >= self.capacity:
                return False
            self.active += 1
            return True

    def release(self) -> None:
        """Free one slot (extra releases leave it at zero)."""
        with self._lock:
            if self.active > 0:
                self.active -= 1

    def _call_handler(self, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        if self.handler is None:
            raise TypeError(f"node {self.name!r} has no handler")
        return self.handler(*args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            self.active += 1
        try:
            return self._call_handler(args, kwargs)
        finally:
            self.release()

    def __repr__(self) -> str:
        return f"<Node {self.name!r} load={self.active}/{self.capacity}>"


class LeastLoadedDispatcher(Dispatcher):
    """Send each call to the least-loaded :class:`Node` that has a free slot.

    Selecting and reserving happen under one lock, so two concurrent calls
    never take the same last slot.  :meth:`route` returns the handler's
    result; when every node is full it raises a ``RuntimeError`` saying the
    nodes are saturated.  The reserved node's handler is called directly, so
    a node reads load 1.0 (not 2.0) while it runs a call at capacity 1.
    """

    def __init__(self, nodes: Iterable[Node] = ()) -> None:
        self._lock = threading.Lock()
        self.nodes: List[Node] = list(nodes)

    def add(self, node: Node) -> Node:
        """Add a node to route to; returns it."""
        with self._lock:
            self.nodes.append(node)
        return node

    def remove(self, node: Node) -> bool:
        """Stop routing to ``node``; False if it was not here."""
        with self._lock:
            if node in self.nodes:
                self.nodes.remove(node)
                return True
            return False

    def select(self, nodes: Optional[Iterable[Any]] = None) -> Node:
        """Reserve a slot on the least-loaded node with room and return it.

        The caller must ``release()`` it.  Raises RuntimeError when all are full.
        """
        with self._lock:
            pool = list(self.nodes if nodes is None else nodes)
            for node in pool:
                if not isinstance(node, Node):
                    raise TypeError(f"LeastLoadedDispatcher routes to Nodes, not {node!r}")
            for node in sorted(pool, key=Node.load):
                if node.try_acquire():
                    return node
        raise RuntimeError(f"all {len(pool)} nodes are saturated; no free slot to route to")

    def route(self, *args: Any, **kwargs: Any) -> Any:
        """Run ``handler(*args, **kwargs)`` on the least-loaded node; return its result."""
        return self._run(self.select(), args, kwargs)

    def dispatch(self, subscribers: Tuple[Callable[..., Any], ...],
                 *args: Any, **kwargs: Any) -> Any:
        node = self.select(subscribers or None)
        return self._run(node, args, kwargs)

    @staticmethod
    def _run(node: Node, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        try:
            return node._call_handler(args, kwargs)
        finally:
            node.release()


# -- events ------------------------------------------------------------------------


class Eventful:
    """One event: an ordered list of subscribers and the dispatcher that calls them.

    Subscribing and firing are thread-safe; a firing sees the subscribers as
    they were when it started (no lock is held while they run).
    """

    def __init__(self, dispatcher: Optional[Dispatcher] = None) -> None:
        self.dispatcher: Dispatcher = dispatcher if dispatcher is not None \
            else BroadcastDispatcher()
        self._subscribers: Tuple[Callable[..., Any], ...] = ()
        self._sub_lock = threading.Lock()

    @property
    def subscribers(self) -> Tuple[Callable[..., Any], ...]:
        """The current subscribers, in order."""
        return self._subscribers

    def subscribe(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Add ``fn`` (called on every :meth:`fire`); returns it."""
        if not callable(fn):
            raise TypeError(f"subscriber must be callable, not {type(fn).__name__}")
        with self._sub_lock:
            self._subscribers = self._subscribers + (fn,)
        return fn

    def on(self, fn: Optional[Callable[..., Any]] = None) -> Any:
        """:meth:`subscribe`, usable as a decorator (``@event.on``)."""
        return self.subscribe(fn) if fn is not None else self.subscribe

    def unsubscribe(self, fn: Callable[..., Any]) -> bool:
        """Remove the first subscription of ``fn``; False if it was not subscribed."""
        with self._sub_lock:
            subs = list(self._subscribers)
            for index, sub in enumerate(subs):
                if sub is fn or sub == fn:
                    del subs[index]
                    self._subscribers = tuple(subs)
                    return True
            return False

    def fire(self, *args: Any, **kwargs: Any) -> Any:
        """Deliver ``(*args, **kwargs)`` through the dispatcher; returns what it returns."""
        return self.dispatcher.dispatch(self._subscribers, *args, **kwargs)


# Class-level subscriptions made by Reporters: target class -> event -> entries.
# An entry is a bound method (strong) or a _WeakHandler (weak=True).
_class_subscriptions: Dict[type, Dict[str, List[Any]]] = {}
_class_lock = threading.Lock()
_class_cache: Dict[Tuple[type, str], Tuple[Any, ...]] = {}


def _class_handlers(cls: type, event: str) -> Tuple[Any, ...]:
    """Entries subscribed to ``event`` on ``cls`` or a base class (cached)."""
    key = (cls, event)
    found = _class_cache.get(key)
    if found is None:
        with _class_lock:
            entries: List[Any] = []
            for klass in cls.__mro__:
                entries.extend(_class_subscriptions.get(klass, {}).get(event, ()))
            found = _class_cache[key] = tuple(entries)
    return found


def _change_class_subscription(target: type, event: str, entry: Any, add: bool) -> None:
    with _class_lock:
        entries = _class_subscriptions.setdefault(target, {}).setdefault(event, [])
        if add:
            # Drop the weak subscriptions of Reporters that were collected.
            entries[:] = [e for e in entries
                          if not isinstance(e, _WeakHandler) or e.ref() is not None]
            entries.append(entry)
        else:
            for index, existing in enumerate(entries):
                if existing is entry:
                    del entries[index]
                    break
        _class_cache.clear()


_NO_EVENTS: Any = type(type.__dict__)({})  # an empty read-only mapping


class Observable:
    """Named events on an object: ``on(event, fn)``, ``fire(event, ...)``, ``events()``.

    A subclass declares its events in ``EVENTS`` (names accumulate along the
    class hierarchy).  Naming an event the class does not declare raises an
    AttributeError that names the class.  Besides the instance's own
    subscribers, a firing reaches the methods Reporters marked with
    ``@observe(TheClass, "event")`` for this class or a base of it.
    """

    EVENTS: Tuple[str, ...] = ()
    # Until the first subscription (or when a subclass skipped __init__).
    _events: Dict[str, Eventful] = _NO_EVENTS

    def __init__(self) -> None:
        self._events = {}

    @classmethod
    def events(cls) -> Tuple[str, ...]:
        """Every event name this class declares (its own and its bases')."""
        names: List[str] = []
        for klass in reversed(cls.__mro__):
            for name in vars(klass).get("EVENTS", ()):
                if name not in names:
                    names.append(name)
        return tuple(names)

    def _check_event(self, event: str) -> None:
        if event not in self.events():
            raise AttributeError(
                f"{type(self).__name__} has no event {event!r}; "
                f"its events are: {', '.join(self.events()) or '(none)'}"
            )

    def event(self, event: str) -> Eventful:
        """The :class:`Eventful` behind ``event`` (to set its dispatcher, say)."""
        found = self._events.get(event)
        if found is None:
            self._check_event(event)
            with _class_lock:
                if self._events is _NO_EVENTS:
                    self._events = {}
                found = self._events.setdefault(event, Eventful())
        return found

    def on(self, event: str, fn: Optional[Callable[..., Any]] = None) -> Any:
        """Subscribe ``fn`` to ``event``; without ``fn``, a decorator.  Returns ``fn``."""
        eventful = self.event(event)
        return eventful.subscribe(fn) if fn is not None else eventful.subscribe

    def off(self, event: str, fn: Callable[..., Any]) -> bool:
        """Unsubscribe ``fn`` from ``event``; False if it was not subscribed."""
        return self.event(event).unsubscribe(fn)

    def fire(self, event: str, *args: Any, **kwargs: Any) -> Any:
        """Fire ``event``: the instance's subscribers, then class-level ones.

        Returns what the instance's dispatcher returned (None without
        subscribers).  The first exception propagates (broadcast order).
        """
        eventful = self._events.get(event)
        if eventful is None:
            self._check_event(event)
            result = None
        else:
            result = eventful.fire(*args, **kwargs)
        if _class_subscriptions:
            for handler in _class_handlers(type(self), event):
                handler(*args, **kwargs)
        return result


class _WeakHandler:
    """A class-level subscription that does not keep its Reporter alive."""

    __slots__ = ("ref",)

    def __init__(self, bound: Any) -> None:
        import weakref

        self.ref = weakref.WeakMethod(bound)

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        method = self.ref()
        if method is not None:  # the Reporter is gone: nothing to do
            method(*args, **kwargs)


def _observed_events(method: Any) -> List[Tuple[type, str]]:
    return list(getattr(method, "_eventforge_observes", ()))


class Reporter:
    """Base class for objects that react to events of whole classes.

    Methods marked ``@observe(TargetClass, "event")`` receive that event from
    every instance of ``TargetClass`` (and its subclasses), with the
    arguments it was fired with.  A Reporter registers on creation and, by
    default, is held strongly: one nobody else references keeps reporting
    until :meth:`unregister` (or the end of a ``with`` block).  Pass
    ``weak=True`` to be dropped when garbage-collected instead.
    """

    def __init__(self, *, weak: bool = False) -> None:
        self._weak = weak
        self._registered: List[Tuple[type, str, Any]] = []
        self.register()

    def _marked_methods(self) -> List[Tuple[type, str, Any]]:
        found: List[Tuple[type, str, Any]] = []
        seen = set()
        for klass in type(self).__mro__:
            for name, attr in vars(klass).items():
                if name in seen:
                    continue
                seen.add(name)
                for target, event in _observed_events(attr):
                    found.append((target, event, getattr(self, name)))
        return found

    @property
    def registered(self) -> bool:
        """True while the marked methods receive events."""
        return bool(self._registered)

    def register(self) -> None:
        """Start receiving the marked events (done by ``__init__``; idempotent)."""
        if self._registered:
            return
        for target, event, bound in self._marked_methods():
            entry = _WeakHandler(bound) if self._weak else bound
            _change_class_subscription(target, event, entry, add=True)
            self._registered.append((target, event, entry))

    def unregister(self) -> None:
        """Stop receiving events (idempotent)."""
        registered, self._registered = self._registered, []
        for target, event, entry in registered:
            _change_class_subscription(target, event, entry, add=False)

    def __enter__(self) -> Reporter:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.unregister()


# -- meters ------------------------------------------------------------------------


def _noop_hook(fn: Callable[..., Any]) -> Callable[..., Any]:
    # Marks a hook that does nothing, so a task skips it on its hot path.
    fn._eventforge_noop = True  # type: ignore[attr-defined]
    return fn


_REDUCTIONS = ("mean", "max", "min", "sum", "last", "count")


class Meter(Observable):
    """Aggregates numbers into one value; also an observer of tasks.

    ``reduction`` picks the value: ``"mean"``, ``"max"``, ``"min"``,
    ``"sum"``, ``"last"`` or ``"count"``.  :meth:`update` adds observations
    (thread-safe; concurrent updates lose nothing).  The aggregate stays
    readable as plain attributes: ``count``, ``sum``, ``last``, ``min_val``
    and ``max_val``.  Every update fires the ``measurement`` event with
    ``(meter, value, ctx)`` (ctx is the TaskContext, or None for a manual
    update).

    As an observer (``@task(on_execute=[meter])``), a subclass measures each
    call in :meth:`measure`; the base Meter measures nothing by itself.

    Locks: ``_lock`` guards the aggregate and is released before
    ``measurement`` fires, so subscribers run holding none of the meter's
    (subscribing takes the Eventful's ``_sub_lock``, never inside ``_lock``).
    """

    EVENTS = ("measurement",)
    REDUCTIONS = _REDUCTIONS

    def __init__(self, name: Optional[str] = None, *, reduction: str = "mean") -> None:
        if reduction not in _REDUCTIONS:
            raise ValueError(
                f"unknown reduction {reduction!r}; choose one of: {', '.join(_REDUCTIONS)}"
            )
        Observable.__init__(self)
        self.name = name if name is not None else type(self).__name__
        self.reduction = reduction
        self._lock = threading.Lock()
        self.count = 0
        self.sum: float = 0
        self.last: Optional[float] = None
        self.min_val: Optional[float] = None
        self.max_val: Optional[float] = None

    def update(self, val: float, n: int = 1, ctx: Optional[TaskContext] = None) -> None:
        """Record ``n`` observations of ``val`` and fire ``measurement``."""
        if n != 1 and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"n must be an integer >= 1, not {n!r}")
        with self._lock:
            total = self.sum + val * n  # a non-number fails here, before any change
            self.count += n
            self.sum = total
            self.last = val
            if self.min_val is None or val < self.min_val:
                self.min_val = val
            if self.max_val is None or val > self.max_val:
                self.max_val = val
        if self._events or _class_subscriptions:
            self.fire("measurement", self, val, ctx)

    def reset(self) -> None:
        """Forget every observation."""
        with self._lock:
            self.count = 0
            self.sum = 0
            self.last = self.min_val = self.max_val = None

    def _value_locked(self) -> Optional[float]:
        reduction = self.reduction
        if reduction == "count":
            return self.count
        if reduction == "sum":
            return self.sum
        if reduction == "mean":
            return self.sum / self.count if self.count else None
        if reduction == "max":
            return self.max_val
        if reduction == "min":
            return self.min_val
        return self.last

    @property
    def value(self) -> Optional[float]:
        """The reduced value (None before the first observation, except count/sum)."""
        with self._lock:
            return self._value_locked()

    @property
    def stats(self) -> Dict[str, Any]:
        """``{"value": ..., "count": ...}`` (subclasses add their own keys)."""
        with self._lock:
            return {"value": self._value_locked(), "count": self.count}

    def attach(self, source: Any) -> Any:
        """Measure ``source``; returns it.

        A task (anything with ``add_observer``) gets this meter as an
        observer.  Another Meter feeds its measurements into this one (a
        ``Meter(reduction="max")`` attached to a TimingMeter keeps the
        slowest call).
        """
        if callable(getattr(source, "add_observer", None)):
            source.add_observer(self)
        elif isinstance(source, Observable) and "measurement" in source.events():
            source.on("measurement", self._on_source_measurement)
        else:
            raise TypeError(f"cannot attach a meter to {source!r}: not a task or a meter")
        return source

    def _on_source_measurement(self, meter: Meter, value: float, ctx: Any) -> None:
        self.update(value, ctx=ctx)

    # -- observer hooks ---------------------------------------------------------

    def measure(self, ctx: TaskContext) -> Optional[float]:
        """The reading for one finished call (None records nothing)."""
        return None

    @_noop_hook
    def on_start(self, ctx: TaskContext) -> None:
        """Called before the call's body runs."""

    @_noop_hook
    def on_success(self, ctx: TaskContext) -> None:
        """Called after the body returned."""

    @_noop_hook
    def on_failure(self, ctx: TaskContext) -> None:
        """Called after the body raised."""

    def on_complete(self, ctx: TaskContext) -> None:
        """Called last, whatever happened: records :meth:`measure` if it gives a number."""
        value = self.measure(ctx)
        if value is not None:
            self.update(value, ctx=ctx)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} {self.reduction}={self.value!r} " \
               f"count={self.count}>"


class TimingMeter(Meter):
    """Per-call elapsed time in seconds (monotonic clock), averaged by default.

    ``stats`` adds ``avg``, ``min``, ``max`` and ``total``.  With a
    ``threshold`` (seconds), a slower call logs a warning, fires the
    ``threshold_exceeded`` event with ``(meter, elapsed, ctx)`` and is counted
    in ``over_threshold``.
    """

    EVENTS = ("threshold_exceeded",)

    def __init__(self, threshold: Optional[float] = None, name: Optional[str] = None, *,
                 reduction: str = "mean") -> None:
        if threshold is not None and (isinstance(threshold, bool)
                                      or not isinstance(threshold, (int, float))
                                      or not threshold >= 0):
            raise ValueError(f"threshold must be a number of seconds >= 0, not {threshold!r}")
        Meter.__init__(self, name, reduction=reduction)
        self.threshold = threshold
        self.over_threshold = 0

    def measure(self, ctx: TaskContext) -> Optional[float]:
        return ctx.execution_time

    def on_complete(self, ctx: TaskContext) -> None:
        elapsed = ctx.execution_time
        self.update(elapsed, 1, ctx)
        threshold = self.threshold
        if threshold is not None and elapsed > threshold:
            with self._lock:
                self.over_threshold += 1
            logger.warning("%s: %s took %.6f s, over the %.6f s threshold",
                           self.name, getattr(ctx, "task_name", "a call"), elapsed, threshold)
            self.fire("threshold_exceeded", self, elapsed, ctx)

    def reset(self) -> None:
        with self._lock:
            self.over_threshold = 0
        Meter.reset(self)

    @property
    def stats(self) -> Dict[str, Any]:
        """count, avg, min, max, total (seconds), value (by reduction), over_threshold."""
        with self._lock:
            count = self.count
            return {
                "count": count,
                "avg": self.sum / count if count else 0.0,
                "min": self.min_val,
                "max": self.max_val,
                "total": self.sum,
                "value": self._value_locked(),
                "over_threshold": self.over_threshold,
            }


# tracemalloc is process-wide: MemoryMeters share one tracing session, started
# by the first call in progress and stopped after the last one (unless someone
# else had started tracing, which is then left alone).
_tracing_lock = threading.Lock()
_tracing_users = 0
_tracing_ours = False


class MemoryMeter(Meter):
    """Per-call peak memory allocated, in bytes (``tracemalloc``), max by default.

    Tracing runs only while a measured call is in progress, so the meter costs
    nothing when unused (tracemalloc slows every allocation while on).

    Concurrency: tracemalloc sees the whole process.  The peak is reset when
    a call starts with no other measured call in progress; overlapping calls
    share it, so each of them reports the process-wide peak since the first
    of them started minus its own starting level: an upper bound that may
    include the others' allocations.
    """

    def __init__(self, name: Optional[str] = None, *, reduction: str = "max") -> None:
        Meter.__init__(self, name, reduction=reduction)

    def on_start(self, ctx: TaskContext) -> None:
        global _tracing_users, _tracing_ours
        import tracemalloc

        with _tracing_lock:
            if _tracing_users == 0:
                if not tracemalloc.is_tracing():
                    tracemalloc.start()
                    _tracing_ours = True
                tracemalloc.reset_peak()
            _tracing_users += 1
            ctx.metadata[self] = tracemalloc.get_traced_memory()[0]

    def on_complete(self, ctx: TaskContext) -> None:
        global _tracing_users, _tracing_ours
        import tracemalloc

        baseline = ctx.metadata.pop(self, None)
        if baseline is None:  # on_start did not run for this call
            return
        with _tracing_lock:
            peak = tracemalloc.get_traced_memory()[1]
            _tracing_users -= 1
            if _tracing_users == 0 and _tracing_ours:
                tracemalloc.stop()
                _tracing_ours = False
        self.update(max(peak - baseline, 0), ctx=ctx)


class CPUMeter(Meter):
    """Per-call CPU time (seconds) of the thread running the call, mean by default.

    Measured with ``time.thread_time()`` from ``on_start`` to
    ``on_complete``; blocking and sleeping cost nothing.
    """

    def __init__(self, name: Optional[str] = None, *, reduction: str = "mean") -> None:
        Meter.__init__(self, name, reduction=reduction)

    def on_start(self, ctx: TaskContext) -> None:
        ctx.metadata[self] = time.thread_time()

    def on_complete(self, ctx: TaskContext) -> None:
        start = ctx.metadata.pop(self, None)
        if start is not None:
            used = time.thread_time() - start
            self.update(used if used > 0.0 else 0.0, ctx=ctx)


class MetricsMeter(Meter):
    """Counts calls, successes and failures; optionally aggregates a number per result.

    ``MetricsMeter()`` only counts: ``stats`` is
    ``{'calls': ..., 'successes': ..., 'failures': ...}``.
    ``MetricsMeter(name, extract)`` also records ``extract(result)`` for each
    successful call (a number, or None to skip it), reduced as any Meter;
    its stats add ``value`` and ``count``.
    """

    def __init__(self, name: Optional[str] = None,
                 extract: Optional[Callable[[Any], Optional[float]]] = None, *,
                 reduction: str = "mean") -> None:
        if extract is not None and not callable(extract):
            raise TypeError(f"extract must be callable, not {type(extract).__name__}")
        Meter.__init__(self, name, reduction=reduction)
        self.extract = extract
        self.calls = 0
        self.successes = 0
        self.failures = 0

    def on_start(self, ctx: TaskContext) -> None:
        with self._lock:
            self.calls += 1

    def on_success(self, ctx: TaskContext) -> None:
        with self._lock:
            self.successes += 1
        if self.extract is not None:
            value = self.extract(ctx.result)
            if value is not None:
                self.update(value, ctx=ctx)

    def on_failure(self, ctx: TaskContext) -> None:
        with self._lock:
            self.failures += 1

    @_noop_hook
    def on_complete(self, ctx: TaskContext) -> None:
        """Nothing to do: the outcome hooks counted the call."""

    def reset(self) -> None:
        with self._lock:
            self.calls = self.successes = self.failures = 0
        Meter.reset(self)

    @property
    def stats(self) -> Dict[str, Any]:
        with self._lock:
            counts = {"calls": self.calls, "successes": self.successes,
                      "failures": self.failures}
            if self.extract is None:
                return counts
            return {"value": self._value_locked(), "count": self.count, **counts}


# -- reporters and @observe ------------------------------------------------------------


def observe(*targets: Any) -> Callable[[Any], Any]:
    """Decorator with two forms.

    ``@observe(meter, ...)`` wraps a plain function so that every call runs
    with those observers around it (a :class:`TaskRunner` without a queue).

    ``@observe(TargetClass, "event")`` marks a :class:`Reporter` method: it
    receives ``event`` from every instance of ``TargetClass`` and its
    subclasses.  Stack it to receive several events.
    """
    if len(targets) == 2 and isinstance(targets[0], type) and isinstance(targets[1], str):
        target, event = targets
        if not issubclass(target, Observable):
            raise TypeError(f"@observe(cls, event) needs an Observable class, not {target!r}")
        if event not in target.events():
            raise AttributeError(
                f"{target.__name__} has no event {event!r}; "
                f"its events are: {', '.join(target.events()) or '(none)'}"
            )

        def mark(method: Any) -> Any:
            marks = list(getattr(method, "_eventforge_observes", ()))
            marks.append((target, event))
            method._eventforge_observes = tuple(marks)
            return method

        return mark
    if not targets:
        raise TypeError("observe() needs observers, or a class and an event name")
    for observer in targets:
        if isinstance(observer, type):
            raise TypeError(f"observe() takes observer instances, not the class {observer!r}")

    def wrap(func: Callable[..., Any]) -> Any:
        return TaskRunner(func, on_execute=list(targets), publish_result=False)

    return wrap


class LoggingReporter(Reporter):
    """Logs every meter measurement, and (used as an observer) every task outcome.

    As a Reporter it receives the ``measurement`` event of every Meter.  In
    ``@task(on_execute=[...])`` it also logs each call's outcome;
    ``log_args``/``log_result`` add the arguments and the return value to
    those lines.  Records go to the logger ``logger_name`` at ``level``
    (failures at ERROR or ``level``, whichever is higher).
    """

    def __init__(self, level: int = logging.INFO, log_args: bool = False,
                 log_result: bool = False, logger_name: str = "eventforge.reporter", *,
                 weak: bool = False) -> None:
        self.level = level
        self.log_args = log_args
        self.log_result = log_result
        self.logger = logging.getLogger(logger_name)
        Reporter.__init__(self, weak=weak)

    @observe(Meter, "measurement")
    def on_measurement(self, meter: Meter, value: Any, ctx: Optional[TaskContext]) -> None:
        """Log one measurement of any Meter."""
        if not self.logger.isEnabledFor(self.level):
            return
        task = f" task={ctx.task_name}" if ctx is not None else ""
        self.logger.log(self.level, "meter=%s value=%r count=%d%s%s", meter.name, value,
                        meter.count, task, self._details(ctx, with_result=True))

    def _details(self, ctx: Optional[TaskContext], with_result: bool) -> str:
        if ctx is None:
            return ""
        text = ""
        if self.log_args:
            text += f" args={ctx.args!r} kwargs={ctx.kwargs!r}"
        if self.log_result and with_result and ctx.error is None:
            text += f" result={ctx.result!r:.200}"
        return text

    def on_complete(self, ctx: TaskContext) -> None:
        """Log the outcome of one task call."""
        if ctx.error is None:
            if self.logger.isEnabledFor(self.level):
                self.logger.log(self.level, "task=%s id=%s succeeded in %.6f s%s",
                                ctx.task_name, ctx.task_id, ctx.execution_time,
                                self._details(ctx, with_result=True))
        else:
            self.logger.log(max(self.level, logging.ERROR),
                            "task=%s id=%s failed in %.6f s: %s: %s%s", ctx.task_name,
                            ctx.task_id, ctx.execution_time, ctx.error_type, ctx.error,
                            self._details(ctx, with_result=False))


# ---------------------------------------------------------------------------
# 9. Tasks
# ---------------------------------------------------------------------------

# @task composes an Executor (how the body runs), an optional MessageQueue
# (a topic that triggers it, topics its results go to) and observers into
# one callable.  A direct call, a message on the topic and an RPC call all
# go through TaskRunner._lifecycle:
#
#     start hooks -> [pool slot] -> body -> success or failure hooks
#     -> publish the result -> complete hooks (always)
#
# Observers' hooks run before the user's callbacks in each phase.  A start
# hook that raises fails the call (the body does not run); an error raised by
# a later hook is reported (logged, counted) and does not change the outcome.
# With no hook, no queue, no cap and inline execution a call is the bare
# function call plus the pool's counters: nothing observes the life cycle,
# so no context is built.


class TaskPool:
    """Counts, and optionally caps, the calls of one task in progress (``my_task.pool``).

    With ``max_instances`` (``@task(max_instances=N)``) at most N calls run
    at once: :meth:`acquire` waits for a free slot (``TimeoutError`` past its
    timeout).  Without it the pool only counts (``max`` and ``available``
    read None).  :meth:`release` frees a slot and raises RuntimeError when
    nothing is held; :meth:`slot` is the context-manager form.  ``stats``
    reports ``active``, ``queued`` (callers waiting), ``available``, ``max``
    and ``total_processed`` (slots released).

    Locks: one, ``_lock`` (``_cond`` waits on it); an uncapped pool counts
    without it.
    """

    def __init__(self, max_instances: Optional[int] = None,
                 timeout: Optional[float] = None) -> None:
        if max_instances is not None and (isinstance(max_instances, bool)
                                          or not isinstance(max_instances, int)
                                          or max_instances < 1):
            raise ValueError(f"max_instances must be an integer >= 1, not {max_instances!r}")
        self.max_instances = max_instances
        self.timeout = _check_timeout(timeout)
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        # One entry per slot held.  Uncapped, list append/pop and next() are
        # atomic on their own, so counting a call takes no lock.  (A _Counter
        # here doubles the overhead of a bare @task(): measured 0.16 -> 0.36 us.)
        self._held: List[None] = []
        self._released = _Counter()
        self._queued = 0

    def acquire(self, timeout: Any = _MISSING) -> None:
        """Take a slot, waiting up to ``timeout`` s (default: the pool's timeout).

        Raises :class:`EventforgeTimeoutError` (a ``TimeoutError``) when no
        slot frees in time.
        """
        limit = self.max_instances
        if limit is None:
            self._held.append(None)
            return
        held = self._held
        with self._lock:
            if len(held) < limit:
                held.append(None)
                return
        wait = self.timeout if timeout is _MISSING else _check_timeout(timeout)
        deadline = None if wait is None else time.monotonic() + wait
        with self._cond:
            self._queued += 1
            try:
                while len(held) >= limit:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise EventforgeTimeoutError(
                            f"no free task slot within {wait} s ({limit} of {limit} in use)"
                        )
                    self._cond.wait(remaining)
            finally:
                self._queued -= 1
            held.append(None)

    def release(self) -> None:
        """Free a slot; RuntimeError if none is held."""
        if self.max_instances is None:
            self._release_one()
            return
        with self._lock:
            self._release_one()
            if self._queued:
                self._cond.notify()

    def _release_one(self) -> None:
        try:
            self._held.pop()
        except IndexError:
            raise RuntimeError("TaskPool.release() called more times than acquire()") from None
        next(self._released.ticks)

    def slot(self, timeout: Any = _MISSING) -> Any:
        """Context manager holding one slot for the ``with`` block."""
        return _PoolSlot(self, timeout)

    @property
    def stats(self) -> Dict[str, Any]:
        """active, queued, available, max, total_processed (max/available None if uncapped)."""
        with self._lock:
            limit = self.max_instances
            active = len(self._held)
            return {
                "active": active,
                "queued": self._queued,
                "available": None if limit is None else limit - active,
                "max": limit,
                "total_processed": self._released.value,
            }

    def __repr__(self) -> str:
        return f"<TaskPool {len(self._held)}/{self.max_instances} active, {self._queued} queued>"


class _PoolSlot:
    __slots__ = ("pool", "timeout")

    def __init__(self, pool: TaskPool, timeout: Any) -> None:
        self.pool = pool
        self.timeout = timeout

    def __enter__(self) -> TaskPool:
        self.pool.acquire(self.timeout)
        return self.pool

    def __exit__(self, *exc_info: Any) -> None:
        self.pool.release()


class _BodyByName:
    """A picklable stand-in for a @task body shadowed by its TaskRunner.

    ``@task`` at module level rebinds the function's name to the runner, so
    the function cannot be pickled by reference; a worker process imports
    the module, finds the runner under that name and calls its body.
    """

    __slots__ = ("module", "qualname")

    def __init__(self, module: str, qualname: str) -> None:
        self.module = module
        self.qualname = qualname

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        target = _resolve_name(self.module, self.qualname)
        body = target.func if isinstance(target, TaskRunner) else target
        return body(*args, **kwargs)

    def __reduce__(self) -> Any:
        return (_BodyByName, (self.module, self.qualname))


def _resolve_name(module: str, qualname: str) -> Any:
    import importlib

    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _task_by_name(module: str, qualname: str) -> Any:
    return _resolve_name(module, qualname)


_OBSERVER_HOOKS = ("on_start", "on_success", "on_failure", "on_complete")


def _check_observer(observer: Any) -> Any:
    """Refuse an observer with no hook at all: it would watch nothing, silently."""
    if not any(hasattr(observer, phase) for phase in _OBSERVER_HOOKS):
        raise TypeError(f"{observer!r} is not an observer: it has none of "
                        f"{', '.join(_OBSERVER_HOOKS)}")
    return observer


def _hooks(phase: str, observers: List[Any], callback: Any) -> Tuple[Callable[..., Any], ...]:
    found = []
    for observer in observers:
        hook = getattr(observer, phase, None)
        if hook is not None and not getattr(hook, "_eventforge_noop", False):
            found.append(hook)
    if callback is not None:
        found.extend(callback if isinstance(callback, (list, tuple)) else [callback])
    for hook in found:
        if not callable(hook):
            raise TypeError(f"{phase} hook must be callable, not {hook!r}")
    return tuple(found)


def _payload_call(payload: Any) -> Tuple[Tuple[Any, ...], Dict[str, Any]]:
    """A triggering message's payload as call arguments."""
    if isinstance(payload, dict):
        return (), dict(payload)
    if isinstance(payload, list):
        return tuple(payload), {}
    return (payload,), {}


_task_thread = threading.local()  # .pooled: this thread runs a THREAD-mode task


class TaskRunner:
    """A function run with observers, an executor and optional queue wiring.

    Built by :func:`task` (see there for the parameters) and usable directly:
    ``TaskRunner(str.upper, executor=ExecutionMode.PROCESS)("hello")``
    returns ``"HELLO"``.  Calling it runs the life cycle and returns the
    result, or raises the call's exception.  ``executor`` is an
    :class:`Executor`, an :class:`ExecutionMode` (the runner then owns an
    executor of that mode; :meth:`close` stops it) or None to run inline.

    Attributes: ``func`` (the body), ``name``, ``topic``, ``queue``,
    ``state`` (a :class:`SharedState`), ``pool`` (a :class:`TaskPool`,
    capped when ``max_instances`` is set), ``observers``.

    Locks, never nested: ``_observer_lock`` (the observers and the hooks
    built from them) and ``_lock`` (error counts); ``pool`` and ``state``
    take their own locks, never while the runner holds one.
    """

    def __init__(
        self,
        func: Callable[..., Any],
        queue: Optional[MessageQueue] = None,
        topic: Optional[str] = None,
        executor: Any = None,
        on_execute: Any = None,
        on_start: Any = None,
        on_success: Any = None,
        on_failure: Any = None,
        on_complete: Any = None,
        publish_result: bool = True,
        max_instances: Optional[int] = None,
        instance_timeout: Optional[float] = None,
    ) -> None:
        if not callable(func):
            raise TypeError(f"@task needs a callable, not {type(func).__name__}")
        if _is_async_callable(func):
            raise TypeError(f"{_callable_name(func)} is a coroutine function; "
                            "@task runs plain functions")
        import functools

        functools.update_wrapper(self, func)
        self.func = func
        self.name: str = getattr(func, "__name__", None) or type(func).__name__
        self.queue = queue
        self.topic = topic if topic is not None else self.name
        if queue is not None:
            validate_topic(self.topic)
        self._owned_executor = False
        if executor is None or isinstance(executor, Executor):
            self.executor: Optional[Executor] = executor
        else:
            self.executor = Executor(mode=executor)
            self._owned_executor = True
        self._mode = None if self.executor is None else self.executor.mode
        self._threaded = self._mode is ExecutionMode.THREAD
        self._in_process = self._mode is ExecutionMode.PROCESS
        self.publish_result = publish_result
        self.state = SharedState()
        self.pool = TaskPool(max_instances, instance_timeout)
        self._callbacks = {"on_start": on_start, "on_success": on_success,
                           "on_failure": on_failure, "on_complete": on_complete}
        if on_execute is None:
            observers: List[Any] = []
        elif isinstance(on_execute, (list, tuple)):
            observers = list(on_execute)
        else:
            observers = [on_execute]
        for observer in observers:
            _check_observer(observer)
        self._observer_lock = threading.Lock()
        self._observers = observers
        self._lock = threading.Lock()
        self._counts = {"publish_errors": 0, "hook_errors": 0}
        self._rebuild_hooks()
        self._subscription: Optional[str] = None
        if queue is not None:
            self._subscription = queue.subscribe(self.topic, self._on_message)

    # -- observers ----------------------------------------------------------------

    def _rebuild_hooks(self) -> None:
        observers = self._observers
        cb = self._callbacks
        self._on_start = _hooks("on_start", observers, cb["on_start"])
        self._on_success = _hooks("on_success", observers, cb["on_success"])
        self._on_failure = _hooks("on_failure", observers, cb["on_failure"])
        self._on_complete = _hooks("on_complete", observers, cb["on_complete"])
        publishes = self._publishes = self.queue is not None and bool(self.publish_result)
        self._bare = not (self._on_start or self._on_success or self._on_failure
                          or self._on_complete or publishes
                          or self.pool.max_instances is not None
                          or (self._mode is not None
                              and self._mode is not ExecutionMode.SEQUENTIAL))

    @property
    def observers(self) -> Tuple[Any, ...]:
        """The observers in ``on_execute`` order."""
        return tuple(self._observers)

    def add_observer(self, observer: Any) -> Any:
        """Add an observer (``meter.attach(task)`` calls this); returns it."""
        with self._observer_lock:
            self._observers = self._observers + [_check_observer(observer)]
            self._rebuild_hooks()
        return observer

    def remove_observer(self, observer: Any) -> bool:
        """Remove an observer; False if it was not there."""
        with self._observer_lock:
            if observer not in self._observers:
                return False
            self._observers = [o for o in self._observers if o is not observer]
            self._rebuild_hooks()
            return True

    # -- calling ------------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._bare:  # only the uncapped pool's counters to keep
            pool = self.pool
            held = pool._held
            held.append(None)
            try:
                return self.func(*args, **kwargs)
            finally:
                held.pop()
                next(pool._released.ticks)
        if self._threaded:
            return self._run(args, kwargs, "call", None)
        return self._lifecycle(args, kwargs, "call", None)

    def run(self, *args: Any, **kwargs: Any) -> Any:
        """Same as calling the task."""
        return self(*args, **kwargs)

    def __get__(self, instance: Any, owner: Any = None) -> Any:
        # @task on a method: bind like a function does.
        if instance is None:
            return self
        import types

        return types.MethodType(self, instance)

    def _run(self, args: Tuple[Any, ...], kwargs: Dict[str, Any], trigger: str,
             message: Optional[Message]) -> Any:
        if self._threaded and not getattr(_task_thread, "pooled", False):
            # The whole life cycle runs on the pool thread, so per-thread
            # observers (CPUMeter) measure the thread that runs the body.  A
            # task called from inside a pooled task runs inline instead: it
            # must not wait for a pool whose threads may all be waiting too.
            executor = self.executor
            assert executor is not None
            future = executor.submit_future(self._pooled_lifecycle,
                                            (args, kwargs, trigger, message))
            return _outcome("task", future).unwrap()
        return self._lifecycle(args, kwargs, trigger, message)

    def _pooled_lifecycle(self, *call: Any) -> Any:
        _task_thread.pooled = True
        try:
            return self._lifecycle(*call)
        finally:
            _task_thread.pooled = False

    def _lifecycle(self, args: Tuple[Any, ...], kwargs: Dict[str, Any], trigger: str,
                   message: Optional[Message]) -> Any:
        ctx = TaskContext(self.name, None, args, kwargs, trigger, message, self.state)
        try:
            try:
                for hook in self._on_start:
                    hook(ctx)
                pool = self.pool
                pool.acquire()
                try:
                    ctx._t0 = _perf_counter()
                    if self._in_process:
                        ctx.result = self._in_worker_process(args, kwargs)
                    else:
                        ctx.result = self.func(*args, **kwargs)
                finally:
                    ctx.stop_clock()
                    pool.release()
            except BaseException as exc:
                if ctx._elapsed is None:  # a start hook or the pool failed
                    ctx.stop_clock()
                ctx.error = exc
                ctx.error_type = exc.remote_type if isinstance(exc, _TaskBodyError) \
                    else type(exc).__name__
                phase, hooks = "on_failure", self._on_failure
            else:
                phase, hooks = "on_success", self._on_success
            for hook in hooks:
                try:
                    hook(ctx)
                except Exception as exc:
                    self._hook_failed(phase, hook, exc)
            if self._publishes:
                self._publish(ctx)
        finally:
            for hook in self._on_complete:
                try:
                    hook(ctx)
                except Exception as exc:
                    self._hook_failed("on_complete", hook, exc)
        if ctx.error is not None:
            raise ctx.error
        return ctx.result

    def _in_worker_process(self, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        executor = self.executor
        assert executor is not None
        result = _outcome("task", executor.submit_future(self._picklable_body(), args, kwargs))
        if result.is_success:
            return result.value
        exc = result.exception
        if exc is not None and type(exc).__name__ == result.error_type:
            raise exc
        # The exception did not pickle, or the call never reached a worker
        # (the executor names that a PicklingError): report what we know.
        raise _TaskBodyError(result.error_type or "Error", result.error or "",
                             result.traceback) from exc

    def _picklable_body(self) -> Callable[..., Any]:
        func = self.func
        module = getattr(func, "__module__", None)
        qualname = getattr(func, "__qualname__", None)
        if module and qualname and "<locals>" not in qualname:
            try:
                found = _resolve_name(module, qualname)
            except (ImportError, AttributeError):
                found = None
            if isinstance(found, TaskRunner) and found.func is func:
                return _BodyByName(module, qualname)
        return func

    def _hook_failed(self, phase: str, hook: Callable[..., Any], exc: BaseException) -> None:
        self._count("hook_errors")
        _report_error(f"task {self.name}: {phase} hook {_callable_name(hook)} failed", exc)

    def _publish(self, ctx: TaskContext) -> None:
        if ctx.error is None:
            topic = self.topic + ".success"
            payload: Dict[str, Any] = {"task_id": ctx.task_id, "result": ctx.result,
                                       "execution_time": ctx.execution_time}
        else:
            topic = self.topic + ".failure"
            payload = {"task_id": ctx.task_id, "error": str(ctx.error),
                       "error_type": ctx.error_type, "execution_time": ctx.execution_time}
        try:
            self.queue.publish(topic, payload)  # type: ignore[union-attr]
        except Exception as exc:
            self._count("publish_errors")
            _report_error(f"task {self.name}: could not publish its result to {topic!r}", exc)

    def _on_message(self, message: Message) -> None:
        args, kwargs = _payload_call(message.payload)
        try:
            self._run(args, kwargs, "queue", message)
        except Exception:
            if not self._callbacks["on_failure"]:
                raise  # nobody handles it: the queue's error path reports it

    def _count(self, key: str) -> None:
        with self._lock:
            self._counts[key] += 1

    @property
    def stats(self) -> Dict[str, int]:
        """Errors nobody could be told about: publish_errors, hook_errors.

        Calls, successes and failures are what observers are for (MetricsMeter).
        """
        with self._lock:
            return dict(self._counts)

    # -- life cycle -----------------------------------------------------------------

    def close(self) -> None:
        """Unsubscribe from the queue and stop an executor this runner created."""
        sub, self._subscription = self._subscription, None
        if sub is not None and self.queue is not None:
            try:
                self.queue.unsubscribe(sub)
            except Exception as exc:  # the transport may already be closed
                logger.debug("task %s: unsubscribe failed: %s", self.name, exc)
        if self._owned_executor and self.executor is not None:
            self.executor.stop(wait=True)

    def __enter__(self) -> TaskRunner:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __reduce__(self) -> Any:
        # A module-level task pickles by name (PROCESS executors, RPC servers).
        module = getattr(self.func, "__module__", None)
        qualname = getattr(self.func, "__qualname__", None)
        if not module or not qualname or "<locals>" in qualname:
            raise TypeError(f"task {self.name!r} is not defined at module level; "
                            "it cannot be pickled")
        return (_task_by_name, (module, qualname))

    def __repr__(self) -> str:
        where = f" topic={self.topic!r}" if self.queue is not None else ""
        return f"<TaskRunner {self.name}{where} observers={len(self._observers)}>"


class _TaskBodyError(RemoteError):
    """A body that failed in a worker process with an exception that did not pickle."""


def task(
    queue: Any = None,
    topic: Optional[str] = None,
    executor: Any = None,
    on_execute: Any = None,
    on_start: Any = None,
    on_success: Any = None,
    on_failure: Any = None,
    on_complete: Any = None,
    publish_result: bool = True,
    max_instances: Optional[int] = None,
    instance_timeout: Optional[float] = None,
) -> Any:
    """Decorator turning a function into a :class:`TaskRunner`.

    Args:
        queue: a MessageQueue: a message on ``topic`` runs the task (a dict
            payload becomes keyword arguments, a list positional arguments,
            anything else the one argument), and results are published.
        topic: the trigger topic (default: the function's name).
        executor: how the body runs: None inline, or an :class:`Executor` /
            :class:`ExecutionMode` (THREAD: the call runs on a pool thread;
            PROCESS: the body runs in a worker process, so it must be a
            module-level function and its arguments and result must pickle).
        on_execute: observers (see section 8), e.g. meters.
        on_start, on_success, on_failure, on_complete: callables (or lists)
            taking the :class:`TaskContext`; they run after the observers.
        publish_result: with a queue, publish ``{task_id, result,
            execution_time}`` to ``<topic>.success`` or ``{task_id, error,
            error_type, execution_time}`` to ``<topic>.failure``.
        max_instances: cap on concurrent calls (a :class:`TaskPool`).
        instance_timeout: seconds to wait for a slot (then TimeoutError).

    Bare ``@task`` works as well as ``@task()``.
    """
    if callable(queue) and not isinstance(queue, MessageQueue):
        return TaskRunner(queue)  # bare @task

    def decorator(func: Callable[..., Any]) -> TaskRunner:
        return TaskRunner(func, queue, topic, executor, on_execute, on_start, on_success,
                          on_failure, on_complete, publish_result, max_instances,
                          instance_timeout)

    return decorator


# ---------------------------------------------------------------------------
# 10. Work queues: WorkStore, MemoryWorkStore, WorkQueue
# ---------------------------------------------------------------------------
# A WorkQueue hands every job to one consumer of each consumer group and keeps
# it leased until the consumer acknowledges it.  The work is split in two:
#
# * a WorkStore owns the job state and every transition that must be atomic:
#   enqueue (with its bound), claim (a Lease with a fencing token and the
#   delivery count), ack / nack / extend by token (a stale token is refused),
#   dead-letter (move and ack in one step), the sweep of expired leases, and
#   the counts.  MemoryWorkStore is the in-process store; a durable store
#   implements the same small interface and plugs in unchanged.
# * the WorkQueue owns the policy: how many retries, after what delay, which
#   reason and dead-letter topic, push delivery on a bounded pool, the reaper
#   thread and the wake-ups.

DEFAULT_CONSUMER_GROUP = "default"
DEAD_LETTER_SUFFIX = ".dead_letter"
_WQ_HEADER_PREFIX = "_wq_"
_WQ_VISIBILITY = "_wq_visibility_timeout"  # a job's own lease length, set by enqueue()
_DEAD_LETTER_REASONS = ("nack_no_requeue", "max_retries_exceeded", "visibility_timeout_exceeded")
_PUMP_WAIT = 1.0  # longest a push turn blocks in claim() before it re-checks its consumer
_CONTENDED_WAIT = 0.05  # ... when other turns wait for a pool thread
_TURN_JOBS = 256  # jobs a pool thread runs for one consumer before it lets others in
_BATCH_BUDGET = 0.005  # prefetched jobs not started within this go back to the queue
_WORK_COUNTERS = ("enqueued", "acked", "retried", "dead_lettered", "expired",
                  "handler_errors", "stale")
_SWEEP_HOLD = 30.0  # how long the reaper holds an expired job while it decides its fate


class Lease:
    """A claimed job: what a consumer holds until it acks, nacks, or the lease runs out.

    ``token`` is the fencing token.  Ack, nack, extend and dead-letter name
    it, and a store refuses a token that is no longer the job's current one
    (the lease expired and the job was handed to someone else), so a late
    worker can never settle another worker's delivery.  ``attempt`` counts the
    deliveries of this job to this group, 1 for the first.  ``deadline`` is on
    the store's clock.  ``handle`` is the store's private reference to the
    job copy (a row id, a stream entry id).
    """

    __slots__ = ("topic", "group", "job_id", "token", "attempt", "message", "deadline",
                 "handle")

    def __init__(self, topic: str, group: str, job_id: str, token: int, attempt: int,
                 message: Message, deadline: float, handle: Any = None) -> None:
        self.topic = topic
        self.group = group
        self.job_id = job_id
        self.token = token
        self.attempt = attempt
        self.message = message
        self.deadline = deadline
        self.handle = handle  # the store's own reference (e.g. a row id)

    def __repr__(self) -> str:
        return (f"Lease(topic={self.topic!r}, group={self.group!r}, job_id={self.job_id!r}, "
                f"token={self.token!r}, attempt={self.attempt})")


def _job_lease_seconds(message: Message, default: float) -> float:
    """The lease length of a job: its own ``visibility_timeout``, else the default."""
    own = message.headers.get(_WQ_VISIBILITY)
    return float(own) if own else default


class WorkStore(abc.ABC):
    """Where a :class:`WorkQueue` keeps its jobs: the atomic state transitions.

    Jobs live per topic and consumer group; each group has its own copy of
    every job enqueued while it exists.  A job enqueued on a topic that has
    no group yet goes to :data:`DEFAULT_CONSUMER_GROUP`, so enqueue-then-
    dequeue works without setup.  A job copy is *ready*, *delayed* (a retry
    waiting for its time), or *in flight* (leased).  Every method is
    thread-safe and each one is a single atomic step; deciding what to do
    (retry or dead-letter, which delay, which topic) is the WorkQueue's job.

    A store is owned by one WorkQueue, which closes it.
    """

    @abc.abstractmethod
    def ensure_group(self, topic: str, group: str) -> None:
        """Create ``group`` for ``topic`` if missing; it receives jobs enqueued from now on."""

    @abc.abstractmethod
    def enqueue(self, topic: str, message: Message, *, max_pending: int = 0) -> str:
        """Add the job ``message`` to every group of ``topic``; return its job id.

        With ``max_pending`` > 0, raise :class:`QueueFullError` (adding
        nothing) when a group already holds that many ready or delayed jobs.
        """

    @abc.abstractmethod
    def claim(self, topic: str, group: str, lease_seconds: float, *, max_count: int = 1,
              wait: Optional[float] = 0.0) -> List[Lease]:
        """Lease up to ``max_count`` ready jobs of ``group``; ``[]`` if none came.

        Each lease lasts the job's own visibility timeout or ``lease_seconds``,
        gets a fresh fencing token and counts one more delivery attempt.
        Waits up to ``wait`` seconds for a job (None: until :meth:`wake` or
        :meth:`close`); returns ``[]`` early when woken.
        """

    @abc.abstractmethod
    def ack(self, lease: Lease) -> bool:
        """Finish the job; False (changing nothing) if the token is stale."""

    def ack_all(self, leases: List[Lease]) -> List[bool]:
        """:meth:`ack` each lease, in one step where the store can; one result each.

        Push delivery acknowledges the jobs of a batch together through this.
        """
        return [self.ack(lease) for lease in leases]

    @abc.abstractmethod
    def nack(self, lease: Lease, delay: float = 0.0, *, count_attempt: bool = True) -> bool:
        """Put the job back, ready again after ``delay`` seconds; False if stale.

        ``count_attempt=False`` undoes the attempt the claim counted (the job
        was released unseen, e.g. while closing).
        """

    @abc.abstractmethod
    def extend(self, lease: Lease, lease_seconds: float) -> bool:
        """Move the lease's deadline to now + ``lease_seconds``; False if stale."""

    @abc.abstractmethod
    def dead_letter(self, lease: Lease, topic: str, message: Message) -> bool:
        """In one step, finish the leased job and enqueue ``message`` on ``topic``.

        The dead-letter enqueue ignores any bound (a job is never lost this
        way).  False, changing nothing, if the token is stale.
        """

    @abc.abstractmethod
    def sweep(self, hold_seconds: float) -> List[Lease]:
        """Take over every lease past its deadline and return the new leases.

        Each expired job gets a new token (so its late holder's ack is
        refused) and a deadline ``hold_seconds`` away, keeping its attempt
        count; the caller then nacks or dead-letters it.  If the caller dies
        in between, the job simply expires again.
        """

    @abc.abstractmethod
    def counts(self, topic: Optional[str] = None, group: Optional[str] = None) -> Dict[str, int]:
        """``ready``, ``delayed``, ``in_flight`` and ``dead`` (jobs dead-lettered away).

        Summed over every topic and/or group left as None.
        """

    def topics(self) -> List[str]:
        """Topics holding jobs or consumer groups (for a :class:`Monitor`; [] if unknown)."""
        return []

    def oldest_ready(self, topic: Optional[str] = None) -> Optional[float]:
        """Enqueue time (epoch seconds) of the oldest ready job, or None (for a monitor)."""
        return None

    @abc.abstractmethod
    def wake(self) -> None:
        """Make every claim blocked right now return ``[]`` at once."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release resources and wake blocked claims; later calls may raise."""


class _MemoryEntry:
    """One group's copy of a job in a MemoryWorkStore."""

    __slots__ = ("message", "attempts", "token", "deadline")

    def __init__(self, message: Message) -> None:
        self.message = message
        self.attempts = 0
        self.token = 0  # 0: not leased
        self.deadline = 0.0


class _MemoryGroup:
    __slots__ = ("ready", "delayed", "leased", "dead", "cond", "waiting", "signalled")

    def __init__(self, lock: threading.Lock) -> None:
        self.ready: Deque[_MemoryEntry] = collections.deque()
        self.delayed: List[Tuple[float, int, _MemoryEntry]] = []  # heap by due time
        self.leased: Dict[str, _MemoryEntry] = {}
        self.dead = 0
        self.cond = threading.Condition(lock)
        self.waiting = 0  # claims blocked on cond (or woken and not yet running)
        # Wake-ups sent by enqueue and not yet taken: never more than the
        # claims woken (notified or timed out) that have not returned, so with
        # waiting <= signalled nobody is left to notify and enqueue skips it.
        self.signalled = 0


class MemoryWorkStore(WorkStore):
    """The in-process :class:`WorkStore`: jobs live as long as the process.

    Lease deadlines sit in one heap, so a sweep costs only the expired
    leases.  ``clock`` (default ``time.monotonic``) is injectable for tests.

    Locks: one, ``_lock``; each consumer group's condition waits on it, and
    nothing outside the store is called while it is held (``clock`` aside).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._topics: Dict[str, Dict[str, _MemoryGroup]] = {}
        # (deadline, token, topic, group, entry); tokens are unique, so entries never compare
        self._deadlines: List[Tuple[float, int, str, str, _MemoryEntry]] = []
        self._tokens = itertools.count(1)
        self._seq = itertools.count()
        self._generation = 0  # bumped by wake(): blocked claims return
        self._closed = False
        self._live = 0  # leases held now; the rest of the deadline heap is stale
        import heapq

        self._heappush = heapq.heappush
        self._heappop = heapq.heappop
        self._heapify = heapq.heapify

    def _groups(self, topic: str) -> Dict[str, _MemoryGroup]:
        groups = self._topics.get(topic)
        if groups is None:
            groups = self._topics[topic] = {}
        return groups

    def _group(self, topic: str, group: str) -> _MemoryGroup:
        groups = self._groups(topic)
        found = groups.get(group)
        if found is None:
            found = groups[group] = _MemoryGroup(self._lock)
        return found

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the work store is closed")

    def ensure_group(self, topic: str, group: str) -> None:
        with self._lock:
            self._check_open()
            self._group(topic, group)

    def enqueue(self, topic: str, message: Message, *, max_pending: int = 0) -> str:
        with self._lock:
            if self._closed:
                raise RuntimeError("the work store is closed")
            groups = self._topics.get(topic)
            if groups is None:
                groups = self._topics[topic] = {}
            if max_pending:
                for name, state in groups.items():
                    if len(state.ready) + len(state.delayed) >= max_pending:
                        raise QueueFullError(
                            f"work queue {topic!r} (group {name!r}) holds "
                            f"max_work_queue_size={max_pending} waiting jobs"
                        )
            self._add_locked(groups, message)
        return message.id

    def _add_locked(self, groups: Dict[str, _MemoryGroup], message: Message) -> None:
        if not groups:
            groups[DEFAULT_CONSUMER_GROUP] = _MemoryGroup(self._lock)
        for state in groups.values():
            state.ready.append(_MemoryEntry(message))
            if state.waiting > state.signalled:
                state.signalled += 1
                state.cond.notify()

    def claim(self, topic: str, group: str, lease_seconds: float, *, max_count: int = 1,
              wait: Optional[float] = 0.0) -> List[Lease]:
        clock = self._clock
        with self._lock:
            self._check_open()
            state = self._group(topic, group)
            generation = self._generation
            end = None if wait is None else clock() + wait
            while True:
                now = clock()
                if state.delayed:
                    self._promote(state, now)
                if state.ready:
                    return self._lease_locked(topic, group, state, lease_seconds, max_count, now)
                if self._closed or generation != self._generation:
                    return []
                timeout = None if end is None else end - now
                if timeout is not None and timeout <= 0:
                    return []
                if state.delayed:
                    due = state.delayed[0][0] - now
                    timeout = due if timeout is None else min(timeout, due)
                state.waiting += 1
                try:
                    state.cond.wait(timeout)
                finally:
                    state.waiting -= 1
                    if state.signalled:
                        state.signalled -= 1

    def _promote(self, state: _MemoryGroup, now: float) -> None:
        while state.delayed and state.delayed[0][0] <= now:
            state.ready.append(self._heappop(state.delayed)[2])

    def _lease_locked(self, topic: str, group: str, state: _MemoryGroup, lease_seconds: float,
                      max_count: int, now: float) -> List[Lease]:
        leases = []
        ready = state.ready
        leased = state.leased
        deadlines = self._deadlines
        push = self._heappush
        tokens = self._tokens
        for _ in range(min(max_count, len(ready))):
            entry = ready.popleft()
            message = entry.message
            entry.attempts += 1
            entry.token = token = next(tokens)
            own = message.headers.get(_WQ_VISIBILITY)
            entry.deadline = deadline = now + (float(own) if own else lease_seconds)
            leased[message.id] = entry
            push(deadlines, (deadline, token, topic, group, entry))
            leases.append(Lease(topic, group, message.id, token, entry.attempts, message,
                                deadline))
        self._live += len(leases)
        if len(deadlines) > 2 * self._live + 1024:
            self._compact()
        return leases

    def _compact(self) -> None:
        # Drop heap items of settled or extended leases (amortised O(1) per lease).
        self._deadlines = [item for item in self._deadlines
                           if item[4].token == item[1] and item[4].deadline == item[0]]
        self._heapify(self._deadlines)

    def _held(self, lease: Lease) -> Optional[Tuple[_MemoryGroup, _MemoryEntry]]:
        # Called with the lock held: the group and entry if the token is current.
        state = self._topics.get(lease.topic, {}).get(lease.group)
        if state is None:
            return None
        entry = state.leased.get(lease.job_id)
        if entry is None or entry.token != lease.token:
            return None
        return state, entry

    def ack(self, lease: Lease) -> bool:
        with self._lock:
            return self._ack_locked(lease)

    def ack_all(self, leases: List[Lease]) -> List[bool]:
        # ack() per lease, inlined: push delivery settles every batch through here.
        results = []
        topics = self._topics
        with self._lock:
            for lease in leases:
                state = topics.get(lease.topic, {}).get(lease.group)
                entry = None if state is None else state.leased.get(lease.job_id)
                if state is None or entry is None or entry.token != lease.token:
                    results.append(False)
                    continue
                del state.leased[lease.job_id]
                entry.token = 0
                self._live -= 1
                results.append(True)
        return results

    def _ack_locked(self, lease: Lease) -> bool:
        return self._unlease(lease) is not None

    def _unlease(self, lease: Lease) -> Optional[Tuple[_MemoryGroup, _MemoryEntry]]:
        # Called with the lock held: end the lease if its token is current.
        held = self._held(lease)
        if held is not None:
            del held[0].leased[lease.job_id]
            held[1].token = 0
            self._live -= 1
        return held

    def nack(self, lease: Lease, delay: float = 0.0, *, count_attempt: bool = True) -> bool:
        with self._lock:
            held = self._unlease(lease)
            if held is None:
                return False
            state, entry = held
            if not count_attempt:
                entry.attempts -= 1
            if delay > 0:
                self._heappush(state.delayed, (self._clock() + delay, next(self._seq), entry))
            else:
                state.ready.append(entry)
            state.cond.notify()
            return True

    def extend(self, lease: Lease, lease_seconds: float) -> bool:
        with self._lock:
            held = self._held(lease)
            if held is None:
                return False
            entry = held[1]
            entry.deadline = lease.deadline = self._clock() + lease_seconds
            self._heappush(self._deadlines,
                           (entry.deadline, entry.token, lease.topic, lease.group, entry))
            return True

    def dead_letter(self, lease: Lease, topic: str, message: Message) -> bool:
        with self._lock:
            held = self._unlease(lease)
            if held is None:
                return False
            held[0].dead += 1
            self._add_locked(self._groups(topic), message)
            return True

    def sweep(self, hold_seconds: float) -> List[Lease]:
        expired = []
        with self._lock:
            now = self._clock()
            heap = self._deadlines
            while heap and heap[0][0] <= now:
                _, token, topic, group, entry = self._heappop(heap)
                if entry.token != token or entry.deadline > now:
                    continue  # settled, re-leased, or extended (a later heap item exists)
                entry.token = next(self._tokens)
                entry.deadline = now + hold_seconds
                self._heappush(heap, (entry.deadline, entry.token, topic, group, entry))
                expired.append(Lease(topic, group, entry.message.id, entry.token,
                                     entry.attempts, entry.message, entry.deadline))
        return expired

    def counts(self, topic: Optional[str] = None, group: Optional[str] = None) -> Dict[str, int]:
        totals = {"ready": 0, "delayed": 0, "in_flight": 0, "dead": 0}
        with self._lock:
            topics = self._topics.items() if topic is None else [
                (topic, self._topics.get(topic, {}))]
            for _, groups in topics:
                for name, state in groups.items():
                    if group is None or name == group:
                        totals["ready"] += len(state.ready)
                        totals["delayed"] += len(state.delayed)
                        totals["in_flight"] += len(state.leased)
                        totals["dead"] += state.dead
        return totals

    def topics(self) -> List[str]:
        with self._lock:
            return sorted(self._topics)

    def oldest_ready(self, topic: Optional[str] = None) -> Optional[float]:
        with self._lock:
            groups = [g for name, gs in self._topics.items() if topic in (None, name)
                      for g in gs.values()]
            firsts = [g.ready[0].message for g in groups if g.ready]
        return min((_message_epoch(m) for m in firsts), default=None)

    def wake(self) -> None:
        with self._lock:
            self._generation += 1
            for groups in self._topics.values():
                for state in groups.values():
                    state.cond.notify_all()

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self.wake()
        with self._lock:
            self._topics.clear()
            self._deadlines.clear()
            self._live = 0

    def __repr__(self) -> str:
        return f"<MemoryWorkStore {len(self._topics)} topics{' closed' if self._closed else ''}>"


_SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS eventforge_groups (
    topic TEXT NOT NULL,
    grp TEXT NOT NULL,
    dead INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (topic, grp)
);
CREATE TABLE IF NOT EXISTS eventforge_jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: (id, token) names one lease
    topic TEXT NOT NULL,
    grp TEXT NOT NULL,
    job_id TEXT NOT NULL,
    body TEXT NOT NULL,                    -- the job Message, wire JSON
    visibility REAL,                       -- the job's own lease length, or NULL
    leased INTEGER NOT NULL DEFAULT 0,
    ready_at REAL NOT NULL,                -- ready (0) jobs: claimable from then on
    wait_len REAL NOT NULL DEFAULT 0,      -- the delay that set ready_at (for clamping)
    deadline REAL,                         -- leased (1) jobs: the lease ends then
    lease_len REAL,                        -- the lease length that set deadline
    token INTEGER NOT NULL DEFAULT 0,      -- fencing token, +1 at every lease
    attempts INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS eventforge_jobs_ready
    ON eventforge_jobs (topic, grp, leased, ready_at, id);
CREATE INDEX IF NOT EXISTS eventforge_jobs_deadline ON eventforge_jobs (leased, deadline);
"""

_LEASE_SET = """leased = 1, token = token + 1, attempts = attempts + 1,
    lease_len = COALESCE(visibility, :lease), deadline = :now + COALESCE(visibility, :lease)"""
_READY_WHERE = "topic = :topic AND grp = :grp AND leased = 0 AND ready_at <= :now"
_CLAIM_RETURNING = f"""UPDATE eventforge_jobs SET {_LEASE_SET}
WHERE id IN (SELECT id FROM eventforge_jobs WHERE {_READY_WHERE}
             ORDER BY ready_at, id LIMIT :n)
RETURNING id, job_id, body, token, attempts, deadline, ready_at"""
_CLAIM_SELECT = f"""SELECT id, token FROM eventforge_jobs WHERE {_READY_WHERE}
ORDER BY ready_at, id LIMIT :n"""
_CLAIM_ONE = f"""UPDATE eventforge_jobs SET {_LEASE_SET}
WHERE id = :id AND token = :token AND leased = 0"""
_LEASED_ROW = """SELECT id, job_id, body, token, attempts, deadline, ready_at
FROM eventforge_jobs WHERE id = ?"""
_HELD = "id = ? AND token = ? AND leased = 1"
_POLL_MIN = 0.002  # an idle claim checks PRAGMA data_version after this, doubling ...
_POLL_MAX = 0.05  # ... up to this: a job from another process is seen within ~50 ms
_SQLITE_BUSY_RETRIES = 5
_SYNCHRONOUS = ("FULL", "NORMAL")

# Connections opened before a fork() are kept here in the child, never used and
# never closed: closing one could checkpoint or unlock on the parent's behalf.
_INHERITED_CONNECTIONS: List[sqlite3.Connection] = []


def _sqlite_problem(exc: BaseException) -> str:
    text = str(exc).lower()
    if "locked" in text or "busy" in text:
        return "busy"
    if "full" in text:
        return "full"
    return "other"


class SQLiteWorkStore(WorkStore):
    """A durable :class:`WorkStore` in one SQLite file, shared by the processes of a machine.

    ``WorkQueue(store="jobs.db")`` opens one; open it yourself for options:

    * ``synchronous="FULL"`` (default) makes every commit durable across a
      power cut; ``"NORMAL"`` is several times faster in WAL mode but may
      lose the last commits (never corrupt the file) if power fails.
    * ``busy_timeout`` seconds SQLite waits for another writer; a write still
      locked out is retried a few times with jitter, then raises
      :class:`StoreBusyError`.  A full disk raises :class:`StoreFullError`
      at once (no retry).
    * ``wal_size_limit`` bytes: SQLite checkpoints the write-ahead log once
      it holds that much, and each sweep truncates it if it still grew past
      (readers pinning old pages can delay a checkpoint, not stop it).
    * ``sweep_interval``: expired leases are swept at most this often.
    * ``clock`` (default ``time.time``, shared by processes) dates leases;
      deadlines and delays are clamped to their length on every sweep, so a
      clock that jumps back strands nothing.

    Every write is one ``BEGIN IMMEDIATE`` transaction (never a read that
    later upgrades, which SQLite fails at once when another writer is busy).
    A claim is a single ``UPDATE ... RETURNING`` on SQLite 3.35+, else a
    select and a conditional update in the same transaction.  A claim that
    waits sees local jobs at once and other processes' commits by polling
    ``PRAGMA data_version`` with backoff (no write while idle).  The
    connection is reopened in a child after ``fork()``.  ``sqlite3`` is
    imported only when a store is opened.

    Locks: one, the reentrant ``_lock`` (``_cond`` waits on it); it guards
    the connection, and SQLite's own file locks are taken only under it.
    """

    def __init__(self, path: Any, *, synchronous: str = "FULL", busy_timeout: float = 5.0,
                 wal_size_limit: int = 64 * 1024 * 1024, sweep_interval: float = 1.0,
                 clock: Callable[[], float] = time.time,
                 use_returning: Optional[bool] = None) -> None:
        import sqlite3

        self._sqlite3 = sqlite3
        self.path = os.fspath(path)
        sync = str(synchronous).upper()
        if sync not in _SYNCHRONOUS:
            raise ValueError(f"synchronous must be one of {', '.join(_SYNCHRONOUS)}, "
                             f"not {synchronous!r}")
        self.synchronous = sync
        _check_seconds("busy_timeout", busy_timeout, positive=False)
        _check_seconds("sweep_interval", sweep_interval, positive=False)
        _check_count("wal_size_limit", wal_size_limit, 0)
        self.busy_timeout = float(busy_timeout)
        self.wal_size_limit = wal_size_limit
        self.sweep_interval = float(sweep_interval)
        self._clock = clock
        has_returning = sqlite3.sqlite_version_info >= (3, 35, 0)
        if use_returning and not has_returning:
            raise ValueError(f"SQLite {sqlite3.sqlite_version} has no UPDATE ... RETURNING "
                             "(3.35+)")
        self.use_returning = has_returning if use_returning is None else bool(use_returning)
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._conn: Optional[sqlite3.Connection] = None
        self._pid = os.getpid()
        self._generation = 0  # bumped by wake()
        self._changes = 0  # bumped by local commits that make jobs ready
        self._poller = False  # a waiting claim is polling PRAGMA data_version
        self._last_sweep = -float("inf")
        self._closed = False
        with self._lock:
            self._connection()
        _watch_for_fork(self)

    # -- the connection -------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        # Called with the lock held.
        if self._closed:
            raise RuntimeError(f"the work store {self.path!r} is closed")
        if self._conn is None or self._pid != os.getpid():
            if self._conn is not None:  # inherited through fork(): leave it alone
                _INHERITED_CONNECTIONS.append(self._conn)
            self._pid = os.getpid()
            self._conn = self._open()
        return self._conn

    def _open(self) -> sqlite3.Connection:
        try:
            conn = self._sqlite3.connect(self.path, timeout=self.busy_timeout,
                                         isolation_level=None, check_same_thread=False)
        except self._sqlite3.Error as exc:  # a directory, a missing parent, no permission
            raise StoreError(f"cannot open {self.path!r}: {exc}") from exc
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(f"{self.path!r} cannot use a write-ahead log "
                                 f"(journal_mode stays {mode!r})")
            conn.execute(f"PRAGMA synchronous={self.synchronous}")
            conn.execute(f"PRAGMA journal_size_limit={self.wal_size_limit}")
            page_size = conn.execute("PRAGMA page_size").fetchone()[0]
            conn.execute(f"PRAGMA wal_autocheckpoint={max(1, self.wal_size_limit // page_size)}")
            statements = [s for s in _SQLITE_SCHEMA.split(";") if s.strip()]
            self._write_on(conn, "create the schema",
                           lambda c: [c.execute(statement) for statement in statements])
        except self._sqlite3.DatabaseError as exc:  # not an SQLite file, or locked at once
            conn.close()
            if _sqlite_problem(exc) == "busy":
                raise StoreBusyError(f"cannot open {self.path!r}: {exc}") from exc
            raise StoreError(f"cannot open {self.path!r}: {exc}") from exc
        except BaseException:
            conn.close()
            raise
        return conn

    def _after_fork_in_child(self) -> None:
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._poller = False

    # -- transactions ---------------------------------------------------------------

    def _write(self, action: str, work: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run ``work(connection)`` in one BEGIN IMMEDIATE transaction, retrying if busy."""
        with self._lock:
            return self._write_on(self._connection(), action, work)

    def _write_on(self, conn: Any, action: str, work: Callable[[Any], Any]) -> Any:
        import random

        for attempt in range(_SQLITE_BUSY_RETRIES + 1):
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    result = work(conn)
                    conn.execute("COMMIT")
                    return result
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            except self._sqlite3.OperationalError as exc:
                problem = _sqlite_problem(exc)
                if problem == "full":
                    raise StoreFullError(f"cannot {action} in {self.path!r}: the database or "
                                         f"disk is full ({exc})") from exc
                if problem != "busy":
                    raise StoreError(f"cannot {action} in {self.path!r}: {exc}") from exc
                if attempt == _SQLITE_BUSY_RETRIES:
                    raise StoreBusyError(
                        f"cannot {action} in {self.path!r}: still locked by another "
                        f"connection after {_SQLITE_BUSY_RETRIES + 1} tries of "
                        f"busy_timeout={self.busy_timeout}s") from exc
                time.sleep(random.uniform(0.0, 0.01 * 2 ** attempt))
        raise AssertionError("unreachable")  # pragma: no cover

    def debug_execute(self, sql: str) -> List[Any]:
        """Run one SQL statement on the store's connection, under its lock; its rows.

        A debug hook, e.g. ``store.debug_execute("PRAGMA integrity_check")``:
        changing jobs behind the store's back voids what it promises.
        """
        with self._lock:
            return self._connection().execute(sql).fetchall()

    def _read(self, sql: str, params: Any = ()) -> List[Any]:
        with self._lock:
            try:
                return self._connection().execute(sql, params).fetchall()
            except self._sqlite3.OperationalError as exc:
                if _sqlite_problem(exc) == "busy":
                    raise StoreBusyError(f"cannot read {self.path!r}: {exc}") from exc
                raise StoreError(f"cannot read {self.path!r}: {exc}") from exc

    def _changed(self) -> None:
        # Called with the lock held after a commit that made jobs ready.
        self._changes += 1
        self._cond.notify_all()

    # -- WorkStore --------------------------------------------------------------------

    def ensure_group(self, topic: str, group: str) -> None:
        self._write("create a consumer group", lambda c: c.execute(
            "INSERT OR IGNORE INTO eventforge_groups (topic, grp) VALUES (?, ?)",
            (topic, group)))

    @staticmethod
    def _insert(conn: sqlite3.Connection, topic: str, message: Message, body: str,
                now: float) -> None:
        groups = [row[0] for row in conn.execute(
            "SELECT grp FROM eventforge_groups WHERE topic = ?", (topic,))]
        if not groups:
            conn.execute("INSERT INTO eventforge_groups (topic, grp) VALUES (?, ?)",
                         (topic, DEFAULT_CONSUMER_GROUP))
            groups = [DEFAULT_CONSUMER_GROUP]
        own = message.headers.get(_WQ_VISIBILITY)
        visibility = float(own) if own else None
        conn.executemany(
            "INSERT INTO eventforge_jobs (topic, grp, job_id, body, visibility, ready_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            [(topic, group, message.id, body, visibility, now) for group in groups])

    def enqueue(self, topic: str, message: Message, *, max_pending: int = 0) -> str:
        body = _dumps(message._wire_dict())  # SerializationError before any write

        def work(conn: sqlite3.Connection) -> None:
            if max_pending:
                for group, waiting in conn.execute(
                        "SELECT grp, COUNT(*) FROM eventforge_jobs WHERE topic = ? AND leased = 0 "
                        "GROUP BY grp", (topic,)):
                    if waiting >= max_pending:
                        raise QueueFullError(
                            f"work queue {topic!r} (group {group!r}) holds "
                            f"max_work_queue_size={max_pending} waiting jobs")
            self._insert(conn, topic, message, body, self._clock())

        with self._lock:
            self._write("enqueue a job", work)
            self._changed()
        return message.id

    def claim(self, topic: str, group: str, lease_seconds: float, *, max_count: int = 1,
              wait: Optional[float] = 0.0) -> List[Lease]:
        end = None if wait is None else time.monotonic() + wait
        with self._lock:
            generation = self._generation
            while True:
                leases = self._write("claim a job", lambda c: self._claim_on(
                    c, topic, group, lease_seconds, max_count))
                if leases or self._closed or generation != self._generation:
                    return leases
                if not self._wait_for_jobs(topic, group, end, generation):
                    return []

    def _claim_on(self, conn: sqlite3.Connection, topic: str, group: str, lease_seconds: float,
                  max_count: int) -> List[Lease]:
        params = {"topic": topic, "grp": group, "now": self._clock(), "lease": lease_seconds,
                  "n": max_count}
        if self.use_returning:
            rows = conn.execute(_CLAIM_RETURNING, params).fetchall()
        else:
            rows = []
            for row_id, token in conn.execute(_CLAIM_SELECT, params).fetchall():
                if conn.execute(_CLAIM_ONE, dict(params, id=row_id, token=token)).rowcount:
                    rows.append(conn.execute(_LEASED_ROW, (row_id,)).fetchone())
        rows.sort(key=lambda row: (row[6], row[0]))
        return [Lease(topic, group, job_id, token, attempts,
                      _message_from_dict(json.loads(body)), deadline, handle=row_id)
                for row_id, job_id, body, token, attempts, deadline, _ in rows]

    def _wait_for_jobs(self, topic: str, group: str, end: Optional[float],
                       generation: int) -> bool:
        """Wait (lock held) until jobs may be ready; False on timeout, wake or close.

        Local commits notify at once.  For other processes' commits one waiter
        of this store polls ``PRAGMA data_version`` (with backoff) and wakes
        the others; the rest just wait.
        """
        conn = self._connection()
        version = conn.execute("PRAGMA data_version").fetchone()[0]
        changes = self._changes
        due = self._read("SELECT MIN(ready_at) FROM eventforge_jobs WHERE topic = ? AND grp = ? "
                         "AND leased = 0", (topic, group))[0][0]
        due_at = None if due is None else time.monotonic() + max(0.0, due - self._clock())
        backoff = _POLL_MIN
        try:
            while True:
                now = time.monotonic()
                if (end is not None and now >= end) or (due_at is not None and now >= due_at):
                    return end is None or now < end
                polling = not self._poller
                if polling:
                    self._poller = True
                limits = [t - now for t in (end, due_at) if t is not None]
                if polling:
                    limits.append(backoff)
                try:
                    self._cond.wait(min(limits) if limits else None)
                finally:
                    if polling:
                        self._poller = False
                if self._closed or generation != self._generation:
                    return False
                if self._changes != changes:
                    return True
                if polling:
                    if self._connection().execute("PRAGMA data_version").fetchone()[0] != version:
                        self._changed()  # wake the other waiters too
                        return True
                    backoff = min(backoff * 2, _POLL_MAX)
        finally:
            self._cond.notify_all()  # if this waiter was polling, another one takes over

    def ack(self, lease: Lease) -> bool:
        return self.ack_all([lease])[0]

    def ack_all(self, leases: List[Lease]) -> List[bool]:
        return self._write("acknowledge jobs", lambda c: [
            c.execute(f"DELETE FROM eventforge_jobs WHERE {_HELD}",
                      (lease.handle, lease.token)).rowcount == 1 for lease in leases])

    def nack(self, lease: Lease, delay: float = 0.0, *, count_attempt: bool = True) -> bool:
        def work(conn: sqlite3.Connection) -> bool:
            return conn.execute(
                "UPDATE eventforge_jobs SET leased = 0, deadline = NULL, ready_at = ?, "
                f"wait_len = ?, attempts = attempts - ? WHERE {_HELD}",
                (self._clock() + delay, delay, 0 if count_attempt else 1, lease.handle,
                 lease.token)).rowcount == 1

        with self._lock:
            done = bool(self._write("release a job", work))
            if done:
                self._changed()
            return done

    def extend(self, lease: Lease, lease_seconds: float) -> bool:
        deadline = self._clock() + lease_seconds
        done = bool(self._write("extend a lease", lambda c: c.execute(
            f"UPDATE eventforge_jobs SET deadline = ?, lease_len = ? WHERE {_HELD}",
            (deadline, lease_seconds, lease.handle, lease.token)).rowcount == 1))
        if done:
            lease.deadline = deadline
        return done

    def dead_letter(self, lease: Lease, topic: str, message: Message) -> bool:
        body = _dumps(message._wire_dict())

        def work(conn: sqlite3.Connection) -> bool:
            if conn.execute(f"DELETE FROM eventforge_jobs WHERE {_HELD}",
                            (lease.handle, lease.token)).rowcount != 1:
                return False
            conn.execute("UPDATE eventforge_groups SET dead = dead + 1 WHERE topic = ? AND "
                         "grp = ?", (lease.topic, lease.group))
            self._insert(conn, topic, message, body, self._clock())
            return True

        with self._lock:
            done = bool(self._write("dead-letter a job", work))
            if done:
                self._changed()
            return done

    def sweep(self, hold_seconds: float) -> List[Lease]:
        with self._lock:
            if time.monotonic() - self._last_sweep < self.sweep_interval:
                return []
            self._last_sweep = time.monotonic()

            def work(conn: sqlite3.Connection) -> List[Any]:
                now = self._clock()
                # Clamp first: after the clock jumped back, nothing waits longer than
                # the lease or delay that set its time.
                conn.execute("UPDATE eventforge_jobs SET deadline = ? + lease_len "
                             "WHERE leased = 1 AND deadline > ? + lease_len", (now, now))
                conn.execute("UPDATE eventforge_jobs SET ready_at = ? + wait_len "
                             "WHERE leased = 0 AND ready_at > ? + wait_len", (now, now))
                expired = conn.execute(
                    "SELECT id, topic, grp, job_id, body, token, attempts FROM eventforge_jobs "
                    "WHERE leased = 1 AND deadline <= ?", (now,)).fetchall()
                conn.executemany(
                    "UPDATE eventforge_jobs SET token = token + 1, deadline = ?, lease_len = ? "
                    "WHERE id = ? AND token = ?",
                    [(now + hold_seconds, hold_seconds, row[0], row[5]) for row in expired])
                return [Lease(topic, group, job_id, token + 1, attempts,
                              _message_from_dict(json.loads(body)), now + hold_seconds,
                              handle=row_id)
                        for row_id, topic, group, job_id, body, token, attempts in expired]

            expired = self._write("sweep expired leases", work)
            self._bound_wal()
            return expired

    def _bound_wal(self) -> None:
        # Called with the lock held, at most once per sweep interval.
        try:
            size = os.path.getsize(self.path + "-wal")
        except OSError:
            return
        if size > self.wal_size_limit:
            try:
                self._connection().execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            except self._sqlite3.OperationalError as exc:
                logger.warning("checkpoint of %r failed (%s); the next sweep retries",
                               self.path, exc)

    def counts(self, topic: Optional[str] = None, group: Optional[str] = None) -> Dict[str, int]:
        where = " AND ".join(clause for clause, value in (("topic = :topic", topic),
                                                          ("grp = :grp", group)) if value)
        where = f"WHERE {where}" if where else ""
        params = {"topic": topic, "grp": group, "now": self._clock()}
        totals = {"ready": 0, "delayed": 0, "in_flight": 0, "dead": 0}
        for leased, ready, number in self._read(
                f"SELECT leased, ready_at <= :now, COUNT(*) FROM eventforge_jobs {where} "
                "GROUP BY 1, 2", params):
            key = "in_flight" if leased else ("ready" if ready else "delayed")
            totals[key] += number
        dead = self._read(f"SELECT SUM(dead) FROM eventforge_groups {where}", params)[0][0]
        totals["dead"] = int(dead or 0)
        return totals

    def topics(self) -> List[str]:
        rows = self._read("SELECT topic FROM eventforge_groups UNION "
                          "SELECT DISTINCT topic FROM eventforge_jobs", {})
        return sorted(row[0] for row in rows)

    def wake(self) -> None:
        with self._lock:
            self._generation += 1
            self._cond.notify_all()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._generation += 1
            self._cond.notify_all()
            conn, self._conn = self._conn, None
            if conn is not None and self._pid == os.getpid():
                conn.close()

    def __repr__(self) -> str:
        return f"<SQLiteWorkStore {self.path!r}{' closed' if self._closed else ''}>"


_FORK_WATCHED: Optional[weakref.WeakSet[SQLiteWorkStore]] = None  # made on first use


def _watch_for_fork(store: SQLiteWorkStore) -> None:
    """Give ``store`` fresh locks in a forked child (its connection reopens lazily)."""
    global _FORK_WATCHED
    if _FORK_WATCHED is None:
        import weakref

        _FORK_WATCHED = weakref.WeakSet()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=_stores_after_fork)
    _FORK_WATCHED.add(store)


def _stores_after_fork() -> None:
    for store in list(_FORK_WATCHED or ()):
        store._after_fork_in_child()


_BROKER_SCHEMES = ("redis://", "rediss://", "unix://")


def _open_work_store(store: Any) -> WorkStore:
    """The store a WorkQueue was given.

    None keeps jobs in memory; a WorkStore object is used as is; a
    ``redis://`` (``rediss://``, ``unix://``) URL opens the Redis Streams
    store of ``eventforge_ext.redis``; any other str or path opens a
    :class:`SQLiteWorkStore` on that file.
    """
    if store is None:
        return MemoryWorkStore()
    if isinstance(store, WorkStore):
        return store
    if isinstance(store, str) and store.startswith(_BROKER_SCHEMES):
        return _open_redis_work_store(store)
    if isinstance(store, (str, os.PathLike)):
        return SQLiteWorkStore(store)
    raise TypeError(f"store must be None, a WorkStore, a file path or a redis:// URL, "
                    f"not {type(store).__name__}")


def _open_redis_work_store(url: str) -> WorkStore:
    import importlib

    try:
        adapter = importlib.import_module("eventforge_ext.redis")
        opener = adapter.RedisWorkStore
    except (ImportError, AttributeError) as exc:
        raise ImportError(
            f"store={url!r} needs the Redis Streams work store, RedisWorkStore from "
            f"eventforge_ext.redis, which is not available here ({exc}); "
            "install eventforge[redis] with a version that provides it") from exc
    return opener.from_url(url)


class _Consumer:
    """A push consumer: a handler in a group, allowed ``limit`` jobs at once.

    Each of its ``limit`` slots claims up to ``prefetch`` jobs at a time."""

    __slots__ = ("id", "topic", "group", "handler", "limit", "prefetch", "removed")

    def __init__(self, consumer_id: str, topic: str, group: str,
                 handler: Callable[[Message], Any], limit: int, prefetch: int) -> None:
        self.id = consumer_id
        self.topic = topic
        self.group = group
        self.handler = handler
        self.limit = limit
        self.prefetch = prefetch
        self.removed = False


class _WorkerPool:
    """At most ``size`` named threads taking turns at the submitted items, FIFO.

    ``run(item)`` returns True to queue the item again (behind the others),
    False to drop it.  Threads start on demand and live until :meth:`close`.
    """

    def __init__(self, name: str, size: int, run: Callable[[Any], bool]) -> None:
        self._name = name
        self._size = size
        self._run = run
        self._cond = threading.Condition()
        self._items: Deque[Any] = collections.deque()
        self._threads: List[threading.Thread] = []
        self._idle = 0
        self._closed = False

    @property
    def contended(self) -> bool:
        """True while items wait for a thread (a turn should be short)."""
        return bool(self._items)

    def submit(self, item: Any) -> None:
        with self._cond:
            if self._closed:
                return
            self._items.append(item)
            if self._idle >= len(self._items) or len(self._threads) >= self._size:
                self._cond.notify()
                return
            thread = threading.Thread(target=self._work, daemon=True,
                                      name=f"{self._name}-{len(self._threads) + 1}")
            self._threads.append(thread)
        thread.start()

    def _work(self) -> None:
        cond = self._cond
        items = self._items
        while True:
            with cond:
                while not items and not self._closed:
                    self._idle += 1
                    cond.wait()
                    self._idle -= 1
                if self._closed:
                    return
                item = items.popleft()
            if self._run(item):
                with cond:
                    if not self._closed:
                        items.append(item)

    def close(self, timeout: Optional[float], nudge: Callable[[], None]) -> None:
        """Drop the waiting items and wait up to ``timeout`` for the running ones.

        ``nudge()`` is called every few milliseconds meanwhile, to wake a
        thread that blocked after the first nudge.
        """
        with self._cond:
            self._closed = True
            self._items.clear()
            self._cond.notify_all()
            threads = [t for t in self._threads if t is not threading.current_thread()]
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in threads:
            while thread.is_alive():
                nudge()
                left = 0.05 if deadline is None else min(0.05, deadline - time.monotonic())
                if left <= 0:
                    return
                thread.join(left)


class WorkQueue(MessageQueue):
    """Competing consumers with acknowledgements, retries and dead letters.

    A WorkQueue is still a :class:`MessageQueue` (``publish``/``subscribe``
    work as ever); on top of that, :meth:`enqueue` adds a *job* that exactly
    one consumer of each consumer group processes.  A consumer either pulls
    (:meth:`dequeue`, then :meth:`ack` or :meth:`nack`) or is pushed jobs
    (:meth:`consume`; returning acks, raising nacks).  A delivered job is
    *leased* for its visibility timeout: not acknowledged in time, it is
    delivered again (at-least-once).

    ``max_retries`` is how many times a failed job is delivered *again*: a
    job is delivered at most ``1 + max_retries`` times per group, then goes
    to ``<topic>.dead_letter`` with the header ``_wq_reason``.  A failed
    attempt is a nack, a raising handler or an expired lease.

    ``store`` holds the jobs (default: in memory, see :class:`WorkStore`);
    ``max_workers`` bounds the threads running push handlers; a retry waits
    ``retry_delay * retry_backoff ** (attempt - 1)`` seconds, at most
    ``max_retry_delay`` (no delay by default).  See docs/workqueue.md.

    Locks, never nested: ``_wq_lock`` (consumers, closing, the reaper),
    ``_waits_lock`` (the wait histogram), MessageQueue's ``_lock``, the
    worker pool's condition and the store's lock; none is held while
    another is taken, and handlers run holding none.
    """

    def __init__(
        self,
        transport: Optional[Transport] = None,
        max_work_queue_size: int = 0,
        default_visibility_timeout: float = 30.0,
        max_retries: int = 3,
        reaper_interval: float = 1.0,
        *,
        store: Any = None,
        max_workers: int = 8,
        retry_delay: float = 0.0,
        retry_backoff: float = 2.0,
        max_retry_delay: float = 300.0,
        on_error: Optional[Callable[[BaseException, Message], Any]] = None,
    ) -> None:
        _check_count("max_work_queue_size", max_work_queue_size, 0)
        _check_count("max_retries", max_retries, 0)
        _check_count("max_workers", max_workers, 1)
        _check_seconds("default_visibility_timeout", default_visibility_timeout, positive=True)
        _check_seconds("reaper_interval", reaper_interval, positive=True)
        _check_seconds("retry_delay", retry_delay, positive=False)
        _check_seconds("max_retry_delay", max_retry_delay, positive=False)
        _check_seconds("retry_backoff", retry_backoff, positive=True)
        self.store: WorkStore = _open_work_store(store)
        super().__init__(transport, on_error=on_error)
        self.max_work_queue_size = max_work_queue_size
        self.default_visibility_timeout = float(default_visibility_timeout)
        self.max_retries = max_retries
        self.reaper_interval = float(reaper_interval)
        self.retry_delay = float(retry_delay)
        self.retry_backoff = float(retry_backoff)
        self.max_retry_delay = float(max_retry_delay)
        self._wq_lock = threading.Lock()
        self._closed = False
        self._leases: Dict[str, Lease] = {}  # delivery id -> lease handed out here
        self._consumers: Dict[str, _Consumer] = {}
        self._consumer_ids = itertools.count(1)
        self._pool = _WorkerPool("eventforge-workqueue-worker", max_workers, self._take_turn)
        self._reaper: Optional[threading.Thread] = None
        self._stop_reaper = threading.Event()
        self._counters = {name: _Counter() for name in _WORK_COUNTERS}
        self._waits = _Histogram()  # enqueue -> first delivery, for a Monitor
        self._waits_lock = threading.Lock()
        self._enqueued = self._counters["enqueued"]

    # -- producing --------------------------------------------------------------

    def enqueue(self, topic: str, payload: Any = None, visibility_timeout: Optional[float] = None,
                **headers: Any) -> str:
        """Add a job on ``topic``; keyword arguments become headers.  Returns the job id.

        Every consumer group of the topic gets the job once.
        ``visibility_timeout`` overrides the queue's lease length for this job.
        Raises :class:`QueueFullError` when a group already holds
        ``max_work_queue_size`` waiting jobs, RuntimeError after :meth:`close`,
        and ValueError for a header starting with ``_wq_`` (reserved).
        """
        if self._closed:
            raise RuntimeError("WorkQueue is closed")
        if type(topic) is not str or topic not in _VALID_TOPICS:
            validate_topic(topic)
        if headers:
            for name in headers:
                if name.startswith(_WQ_HEADER_PREFIX):
                    raise ValueError(f"header {name!r} is reserved: headers starting with "
                                     f"{_WQ_HEADER_PREFIX!r} belong to the work queue")
        if visibility_timeout is not None:
            _check_seconds("visibility_timeout", visibility_timeout, positive=True)
            headers[_WQ_VISIBILITY] = float(visibility_timeout)
        message = _make_message(topic, payload, headers)
        if self._reaper is None:
            self._start_reaper()
        job_id = self.store.enqueue(topic, message, max_pending=self.max_work_queue_size)
        self._enqueued.add()
        return job_id

    # -- pulling ----------------------------------------------------------------

    def dequeue(self, topic: str, timeout: Optional[float] = None) -> Optional[Message]:
        """Lease the next job of ``topic`` (default group), waiting up to ``timeout``.

        Returns the job as a Message whose header ``_wq_delivery_id`` names
        this delivery for :meth:`ack`, :meth:`nack` and :meth:`touch`, or
        None on timeout or close.
        """
        _refuse_receive_pattern(topic)
        validate_topic(topic)
        self._check_open()
        self._start_reaper()
        group = DEFAULT_CONSUMER_GROUP
        self.store.ensure_group(topic, group)
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = _PUMP_WAIT if end is None else max(0.0, end - time.monotonic())
            try:
                leases = self.store.claim(topic, group, self.default_visibility_timeout,
                                          wait=wait)
            except RuntimeError:
                if self.closed:  # closed while we were on the way in
                    return None
                raise
            if leases:
                self._note_waits(leases, time.time())
                return self._hand_out(leases[0])
            if self._closed or (end is not None and time.monotonic() >= end):
                return None

    def _note_waits(self, leases: List[Lease], now: float) -> None:
        # Time enqueue -> first delivery (``now``, epoch seconds) for a Monitor,
        # under one lock round trip for a whole batch.
        waits = []
        for lease in leases:
            if lease.attempt == 1:
                try:
                    waits.append(max(0.0, now - _message_epoch(lease.message)))
                except (ValueError, TypeError):  # a timestamp we cannot read: not timed
                    pass
        if waits:
            observe = self._waits.observe
            with self._waits_lock:
                for waited in waits:
                    observe(waited)

    def _hand_out(self, lease: Lease) -> Message:
        # Remember the lease (dict writes are atomic) and build the delivered copy.
        # The caller times the first deliveries (_note_waits).
        job = lease.message
        delivery_id = f"{lease.job_id}:{lease.token}"
        self._leases[delivery_id] = lease
        headers = {**job.headers, "_wq_delivery_id": delivery_id, "_wq_attempt": lease.attempt,
                   "_wq_group": lease.group}
        return _init_message(_new_object(Message), job.id, lease.topic, job.payload, headers,
                             job._ts, job.reply_to, job.correlation_id)

    # -- settling ---------------------------------------------------------------

    def _take_lease(self, delivery: Any, action: str) -> Optional[Lease]:
        delivery_id = delivery.headers.get("_wq_delivery_id") if isinstance(
            delivery, Message) else delivery
        lease = self._leases.pop(delivery_id, None) if isinstance(delivery_id, str) else None
        if lease is None:
            self._counters["stale"].add()
            logger.warning("%s of delivery %r refused: unknown, already settled or expired",
                           action, delivery_id)
        return lease

    def _refused(self, lease: Lease, action: str) -> bool:
        self._counters["stale"].add()
        logger.warning("%s of job %s on %r (group %r) refused: its lease expired and the job "
                       "was taken over", action, lease.job_id, lease.topic, lease.group)
        return False

    def ack(self, delivery: Any) -> bool:
        """Finish a delivered job (a Message from :meth:`dequeue` or its delivery id).

        Returns False, and logs why, when the delivery is unknown, already
        settled, or its lease expired and the job was handed on (the fencing
        token no longer matches); the job is then left to its new holder.
        """
        lease = self._take_lease(delivery, "ack")
        if lease is None:
            return False
        if not self._settle_ack(lease):
            return self._refused(lease, "ack")
        return True

    def _settle_ack(self, lease: Lease) -> bool:
        if self.store.ack(lease):
            self._counters["acked"].add()
            return True
        return False

    def nack(self, delivery: Any, requeue: bool = True) -> bool:
        """Give a delivered job back: retried (after the retry delay) or dead-lettered.

        With ``requeue=True`` the job is delivered again unless it already
        used its ``max_retries`` retries (then reason ``max_retries_exceeded``);
        ``requeue=False`` dead-letters it at once (``nack_no_requeue``).
        Returns False like :meth:`ack` when the delivery is not held any more.
        """
        lease = self._take_lease(delivery, "nack")
        if lease is None:
            return False
        if not self._settle_failed(lease, requeue, None):
            return self._refused(lease, "nack")
        return True

    def touch(self, delivery: Any, visibility_timeout: Optional[float] = None) -> bool:
        """Extend a delivered job's lease: it now ends ``visibility_timeout`` from now.

        The default is the job's own visibility timeout.  A handler doing long
        work calls this periodically.  Returns False if the lease is no
        longer held.
        """
        delivery_id = delivery.headers.get("_wq_delivery_id") if isinstance(
            delivery, Message) else delivery
        lease = self._leases.get(delivery_id) if isinstance(delivery_id, str) else None
        if lease is None:
            return False
        seconds = visibility_timeout
        if seconds is None:
            seconds = _job_lease_seconds(lease.message, self.default_visibility_timeout)
        else:
            _check_seconds("visibility_timeout", seconds, positive=True)
        return self.store.extend(lease, float(seconds))

    def _settle_failed(self, lease: Lease, requeue: bool, error: Optional[BaseException]) -> bool:
        # The policy for a failed attempt: retry, or dead-letter with a reason.
        if not requeue:
            return self._dead_letter(lease, "nack_no_requeue", error)
        if lease.attempt > self.max_retries:
            return self._dead_letter(lease, "max_retries_exceeded", error)
        if self.store.nack(lease, self._retry_delay(lease.attempt)):
            self._counters["retried"].add()
            return True
        return False

    def _retry_delay(self, attempt: int) -> float:
        if not self.retry_delay:
            return 0.0
        return min(self.retry_delay * self.retry_backoff ** (attempt - 1), self.max_retry_delay)

    def _dead_letter(self, lease: Lease, reason: str, error: Optional[BaseException]) -> bool:
        job = lease.message
        headers = {k: v for k, v in job.headers.items() if not k.startswith(_WQ_HEADER_PREFIX)}
        headers.update(_wq_reason=reason, _wq_original_topic=lease.topic,
                       _wq_group=lease.group, _wq_attempts=lease.attempt,
                       _wq_job_id=lease.job_id)
        if error is not None:
            headers["_wq_error"] = f"{type(error).__name__}: {error}"[:1000]
        topic = lease.topic + DEAD_LETTER_SUFFIX
        letter = _make_message(topic, job.payload, headers)
        if not self.store.dead_letter(lease, topic, letter):
            return False
        self._counters["dead_lettered"].add()
        logger.warning("job %s on %r (group %r) dead-lettered to %r after %d attempt(s): %s",
                       lease.job_id, lease.topic, lease.group, topic, lease.attempt, reason)
        return True

    # -- pushing ----------------------------------------------------------------

    def consume(self, topic: str, handler: Callable[[Message], Any],
                consumer_group: Optional[str] = None, *, concurrency: int = 1,
                prefetch: int = 16) -> str:
        """Push jobs of ``topic`` to ``handler``; returns a consumer id.

        Consumers in one group share its jobs: an idle consumer waits in line
        and the one waiting longest takes the next job (round-robin while they
        keep up).  Every group gets its own copy of each job; None is the
        default group, the one :meth:`dequeue` reads.  A handler that returns
        acks its job; one that raises (anything, BaseException included) has
        the job nacked and the error logged (or passed to ``on_error``).
        ``concurrency`` is how many jobs this consumer may run at once, on the
        queue's pool of at most ``max_workers`` threads.  While its handler
        finishes within a couple of milliseconds, each slot claims up to
        ``prefetch`` jobs at a time (fewer lock round trips); jobs it has not
        started after 5 ms go back to the queue.  ``prefetch=1`` claims one
        job at a time.
        """
        _refuse_receive_pattern(topic)
        validate_topic(topic)
        if not callable(handler):
            raise TypeError(f"handler must be callable, not {type(handler).__name__}")
        if _is_async_callable(handler):
            raise TypeError(f"handler {_callable_name(handler)} is a coroutine function; "
                            "consume() takes a plain function")
        _check_count("concurrency", concurrency, 1)
        _check_count("prefetch", prefetch, 1)
        group = DEFAULT_CONSUMER_GROUP if consumer_group is None else consumer_group
        if not isinstance(group, str) or not group:
            raise ValueError(f"consumer_group must be a non-empty str, not {consumer_group!r}")
        self._check_open()
        self.store.ensure_group(topic, group)
        self._start_reaper()
        consumer = _Consumer(f"consumer-{next(self._consumer_ids)}", topic, group, handler,
                             concurrency, prefetch)
        with self._wq_lock:
            self._check_open()
            self._consumers[consumer.id] = consumer
        for _ in range(concurrency):  # one turn per job it may run at once
            self._pool.submit(consumer)
        return consumer.id

    def remove_consumer(self, consumer_id: str) -> bool:
        """Stop pushing jobs to a consumer; the jobs it is running finish normally.

        Returns False for an unknown id.  The group's last consumer gone,
        its jobs wait for the next consumer or :meth:`dequeue`.
        """
        with self._wq_lock:
            consumer = self._consumers.pop(consumer_id, None)
        if consumer is None:
            return False
        consumer.removed = True
        self.store.wake()  # its turns blocked in claim() return and end
        return True

    def _take_turn(self, consumer: _Consumer) -> bool:
        """A pool thread serves one consumer for a while; True to queue its turn again.

        The thread claims jobs for the consumer, runs and settles them, and
        goes on while jobs come; it gives the turn back (to the end of the
        pool's line) after a quiet claim, or sooner when other turns wait.
        While the handler keeps finishing fast, claims grow to ``prefetch``
        jobs at a time; jobs not started within _BATCH_BUDGET go back.
        """
        store = self.store
        batch = 1
        handled = 0
        while handled < _TURN_JOBS:
            if consumer.removed or self._closed:
                return False
            wait = _CONTENDED_WAIT if self._pool.contended else _PUMP_WAIT
            try:
                leases = store.claim(consumer.topic, consumer.group,
                                     self.default_visibility_timeout, max_count=batch, wait=wait)
            except Exception:
                if self.closed:
                    return False
                logger.exception("claiming jobs of %r (group %r) failed; retrying",
                                 consumer.topic, consumer.group)
                self._stop_reaper.wait(_PUMP_WAIT)
                return True
            if not leases:
                return True
            delivered = time.time()
            started = time.monotonic()
            finished: List[Lease] = []
            count = len(leases)
            if count == 1:  # a lone (maybe slow) job is timed before it runs
                self._note_waits(leases, delivered)
            try:
                for index, lease in enumerate(leases):
                    if consumer.removed or self._closed or (
                            index and time.monotonic() - started > _BATCH_BUDGET):
                        count = index
                        for unstarted in leases[index:]:
                            store.nack(unstarted, count_attempt=False)
                        break
                    done = self._run_job(consumer, self._hand_out(lease))
                    if done is not None:
                        finished.append(done)
            finally:
                # A batch of quick jobs is timed at its end, in one step; only
                # its started jobs were delivered (the rest will be, later).
                if len(leases) > 1:
                    self._note_waits(leases[:count], delivered)
                if finished:
                    self._ack_finished(finished)
            handled += len(leases)
            quick = time.monotonic() - started < _BATCH_BUDGET / 2
            batch = min(batch * 2, consumer.prefetch) if quick else 1
        return True

    def _run_job(self, consumer: _Consumer, message: Message) -> Optional[Lease]:
        """Run one pushed job; return its lease to ack, or None if it is settled already.

        A raising handler's job goes through the failure policy here.
        """
        try:
            consumer.handler(message)
        except BaseException as exc:  # the pool thread survives anything
            try:
                self._counters["handler_errors"].add()
                self._handler_failed(consumer.handler, message, exc)
                lease = self._leases.pop(message.headers["_wq_delivery_id"], None)
                if lease is not None and not self._settle_failed(lease, True, exc):
                    self._refused(lease, "nack")
            except Exception:
                logger.exception("settling job %s on %r failed", message.id, message.topic)
            return None
        # None when the handler settled the job itself.
        return self._leases.pop(message.headers["_wq_delivery_id"], None)

    def _ack_finished(self, leases: List[Lease]) -> None:
        try:
            results = self.store.ack_all(leases)
        except Exception:
            logger.exception("acknowledging %d job(s) of %r failed; they will be redelivered "
                             "when their leases expire", len(leases), leases[0].topic)
            return
        done = 0
        for lease, settled in zip(leases, results):
            if settled:
                done += 1
            else:
                self._refused(lease, "ack")
        if done:
            self._counters["acked"].add(done)

    # -- expiry -----------------------------------------------------------------

    def _start_reaper(self) -> None:
        if self._reaper is not None:
            return
        with self._wq_lock:
            if self._reaper is not None or self._closed:
                return
            self._reaper = threading.Thread(target=self._reap_loop, daemon=True,
                                            name="eventforge-workqueue-reaper")
            self._reaper.start()

    def _reap_loop(self) -> None:
        while not self._stop_reaper.wait(self.reaper_interval):
            try:
                self.reap()
            except Exception:
                if self._closed:
                    return
                logger.exception("work queue reaper failed; it keeps running")

    def reap(self) -> int:
        """Handle every expired lease now (the reaper thread calls this); returns the count.

        An expired job is delivered again, or dead-lettered with reason
        ``visibility_timeout_exceeded`` when it used its ``max_retries``.
        """
        expired = self.store.sweep(_SWEEP_HOLD)
        if not expired:
            return 0
        taken_over = {(lease.topic, lease.group, lease.job_id) for lease in expired}
        with self._wq_lock:
            for key, held in list(self._leases.items()):
                if (held.topic, held.group, held.job_id) in taken_over:
                    del self._leases[key]
        for lease in expired:
            self._counters["expired"].add()
            logger.info("lease of job %s on %r (group %r) expired after attempt %d",
                        lease.job_id, lease.topic, lease.group, lease.attempt)
            if lease.attempt > self.max_retries:
                self._dead_letter(lease, "visibility_timeout_exceeded", None)
            elif self.store.nack(lease, self._retry_delay(lease.attempt)):
                self._counters["retried"].add()
        return len(expired)

    # -- counts and lifecycle -----------------------------------------------------

    def pending_count(self, topic: Optional[str] = None,
                      consumer_group: Optional[str] = None) -> int:
        """Jobs waiting (ready or delayed) on ``topic``, for ``consumer_group``.

        None for either means summed over all topics / groups.
        """
        counts = self.store.counts(topic, consumer_group)
        return counts["ready"] + counts["delayed"]

    def in_flight_count(self, topic: Optional[str] = None,
                        consumer_group: Optional[str] = None) -> int:
        """Jobs delivered and not yet settled (leased), like :meth:`pending_count`."""
        return self.store.counts(topic, consumer_group)["in_flight"]

    @property
    def stats(self) -> Dict[str, Any]:
        """MessageQueue stats plus ``work``: counts of jobs enqueued, acked, retried,
        dead-lettered, expired, handler errors, and refused (stale) settlements."""
        stats = super().stats
        stats["work"] = {name: c.value for name, c in self._counters.items()}
        return stats

    def monitor_snapshot(self) -> Dict[str, Any]:
        """This queue as a :class:`Monitor` shows it (one row, all topics summed).

        ``ready``/``in_flight``/``delayed`` exclude dead-letter topics, whose
        waiting jobs are ``dead_letters``; ``nacked_total`` counts failed
        attempts (each one retried or dead-lettered); ``wait_seconds`` is the
        histogram of enqueue-to-first-delivery times; ``topics`` breaks the
        counts down per topic (at most 100).
        """
        store = self.store
        row: Dict[str, Any] = {"ready": 0, "in_flight": 0, "delayed": 0, "dead_letters": 0}
        topics: Dict[str, Dict[str, int]] = {}
        names = store.topics()
        stamps = []
        for topic in names:
            counts = store.counts(topic)
            if topic.endswith(DEAD_LETTER_SUFFIX):
                row["dead_letters"] += counts["ready"] + counts["delayed"] + counts["in_flight"]
            else:
                for key in ("ready", "in_flight", "delayed"):
                    row[key] += counts[key]
                stamps.append(store.oldest_ready(topic))
            if len(topics) < 100:
                topics[topic] = counts
        if not names:  # a store that cannot list its topics: totals only
            counts = store.counts()
            row.update(ready=counts["ready"], in_flight=counts["in_flight"],
                       delayed=counts["delayed"])
        oldest = min((t for t in stamps if t is not None), default=None) if names else (
            store.oldest_ready())
        waiting = row["ready"] > 0
        # None when the store cannot tell (a monitor shows it as unknown).
        row["oldest_ready_age_seconds"] = (max(0.0, time.time() - oldest) if oldest else
                                           (None if waiting else 0.0))
        work = {name: c.value for name, c in self._counters.items()}
        row.update(acked_total=work["acked"], nacked_total=work["retried"] + work["dead_lettered"],
                   redelivered_total=work["retried"], dead_lettered_total=work["dead_lettered"])
        with self._waits_lock:
            row["wait_seconds"] = self._waits.snapshot()
        row["topics"] = topics
        return row

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("WorkQueue is closed")

    def close(self, timeout: Optional[float] = 10.0) -> None:
        """Stop: wake blocked :meth:`dequeue` calls, stop push delivery and the reaper.

        Handlers already running get up to ``timeout`` seconds to finish and
        settle their jobs.  Then the store and the transport are closed.
        """
        with self._wq_lock:
            if self._closed:
                return
            self._closed = True
            reaper = self._reaper
            for consumer in self._consumers.values():
                consumer.removed = True
            self._consumers.clear()
        self._stop_reaper.set()
        self._pool.close(timeout, self.store.wake)
        if reaper is not None:
            reaper.join(timeout)
        self.store.close()
        super().close()

    def __enter__(self) -> WorkQueue:
        return self

    def __repr__(self) -> str:
        return f"<WorkQueue on {self.store!r}{' closed' if self._closed else ''}>"


def _check_count(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, not {value!r}")


def _check_seconds(name: str, value: Any, *, positive: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or (
            value <= 0 if positive else value < 0):
        raise ValueError(f"{name} must be a number of seconds {'> 0' if positive else '>= 0'}, "
                         f"not {value!r}")


# ---------------------------------------------------------------------------
# 11. TCP transports
# ---------------------------------------------------------------------------

# Frames are those of section 3.  Peers that speak our handshake exchange a
# few control frames on reserved ``$`` topics (docs/protocol.md, "TCP connections"):
#
#   client -> server  $hello     {version, features, nonce, ping_interval, max_frame_size}
#   server -> client  $welcome   {version, features, auth, nonce, max_frame_size, ping_interval}
#                     (a late $welcome switches a client that fell back to plain frames)
#   client -> server  $auth      {proof}             only when the server has a secret
#   server -> client  $ready     {proof}             only when the server has a secret
#   client -> server  $interest  {add: [...], remove: [...]}
#                     (feature "reply": a request's inbox reply_to is an implied add)
#   server -> client  $ack       {n}                 data frames handled so far
#   client -> server  $flush     {id}                feature "flush"
#   server -> client  $flushed   {id}                all frames before $flush handled
#   either way        $ping {} / $pong {}
#   server -> client  $error     {code, reason}      just before the server closes
#
# A peer whose first frame is not ``$hello`` speaks plain frames (an eventforge 0.1
# client): it receives every message the server routes but other
# connections' inbox messages, and is refused when the server has a secret
# or ``allow_frame_only=False``.
#
# I/O model: one selector loop per server and one per client.  A sender
# writes from its own thread when the connection is idle (no thread hop on
# the way out); arriving messages reach inboxes and receivers from the
# reading thread.  Subscriber callbacks run on the server's reading thread
# (leader/follower: a standby takes the loop over when one blocks) and on the
# client's dispatcher thread; a caller waiting for a reply reads the socket
# itself.  A handler may block without stalling any socket, and one
# connection's messages keep their order.

#: Version of the handshake protocol spoken by this module.
PROTOCOL_VERSION = 1
#: Default TCP port, the same as eventforge 0.1's.
DEFAULT_TCP_PORT = 9090

_FEATURES = frozenset(("interest", "ack", "ping", "reply", "flush"))
_PROGRESS_FEATURES = frozenset(("ack", "flush"))  # the server tracks which frames were handled
_HANDSHAKE_MAX_FRAME = 4096  # read cap before a secret-protected peer has authenticated
_AUTH_LABEL_CLIENT = b"eventforge-v1 client"
_AUTH_LABEL_SERVER = b"eventforge-v1 server"
_ACK_EVERY = 512  # acknowledge at once after this many data frames, else on the next tick
_ACK_DELAY = 0.02
_RECV_SIZE = 256 * 1024
# dispatch="leader": a handler that has run this long on the I/O thread makes
# the standby thread take the I/O loop over; the standby checks this often
# while handlers run, and sleeps until woken after a second without any.
_TAKEOVER_AFTER = 0.002
_STANDBY_IDLE = 1.0
_MAX_PEER_NAME = 128
_CLOSED_KEPT = 256  # closed connections a server remembers for a monitor (a ring)
_conn_ids = itertools.count(1)

# Counters always present in TCPServerTransport.stats (each refusal has its own).
_SERVER_COUNTERS = (
    "accepted", "refused_connections", "accept_errors", "disconnects", "messages_in",
    "messages_out", "bytes_in", "frame_errors", "oversize_frames", "truncated_frames",
    "resets", "frame_timeouts", "handshake_timeouts", "auth_failures", "tls_failures",
    "protocol_errors", "slow_consumers", "dead_peers", "internal_errors", "expired",
    "oversize_for_peer", "frame_only_refused", "unhandled_at_close",
)
_CLIENT_COUNTERS = (
    "messages_out", "messages_in", "buffered", "full", "resent", "disconnects",
    "reconnect_attempts", "reconnects", "dead_peers", "mailbox_full", "frame_errors",
    "oversize_frames", "protocol_errors", "too_large", "refused", "withdrawn", "expired",
    "failed_requests",
)
# A frame that was the oldest unacknowledged one on this many connections
# that all broke is taken as refused by the server and dropped.
_MAX_SEND_ATTEMPTS = 3
# close() waits this long by default for what the client accepted to be
# delivered; clients still open at interpreter exit share one such wait.
_CLOSE_TIMEOUT = 2.0

# Connection states
_TLS, _NEW, _AUTH, _READY = "tls", "new", "auth", "ready"

# Results of _Connection.enqueue
_OK, _CLOSED, _OVERFLOW = 0, 1, 2
# Results of _Connection.defer
_WRITE_NOW, _WRITE_SCHEDULE, _WRITE_PENDING = 0, 1, 2
_HOT_GAP = 25e-6  # frames closer than this are batched by the I/O thread
# A client's I/O thread lets a publisher's burst grow while its frames keep
# coming, for at most this long or this many bytes (see _scheduled_flush).
_BURST_HOLD = 0.001
_BURST_BYTES = 64 * 1024
_REMOVALS_BATCH = 256  # withdrawn interest waits for a tick unless this many pile up
_CALLER_READ = 0.005  # a caller waiting for a reply reads the socket itself this long
_NO_PEER_LIMIT = 1 << 32  # a peer that named no max_frame_size: the length prefix's own bound
_MAX_FLUSHES = 1024  # $flush requests one connection may have waiting
_TTL_HEADER = "_ttl_ms"
# A server handler call: (subscriptions, message, expiry or 0.0, connection read from).
_Call = Tuple[Tuple[Any, ...], Message, float, Any]


def _ttl_expiry(value: Any) -> float:
    """The monotonic deadline of a request whose ``_ttl_ms`` header is ``value``, or 0.0."""
    if type(value) is int and value >= 0:
        return _monotonic() + value / 1000.0
    return 0.0  # absent or malformed: no deadline


def _control_frame(topic: str, payload: Dict[str, Any]) -> bytes:
    """Encode a small control frame (only ``topic`` and ``payload`` keys)."""
    body = _dumps({"topic": topic, "payload": payload}).encode("utf-8")
    return len(body).to_bytes(4, "big") + body


_CONTROL_PREFIX = b'{"topic":"$'


def _fast_control(body: bytes) -> Optional[Tuple[str, Any]]:
    """Parse a control frame in our compact form (no Message built); None for any other shape."""
    if not body.startswith(_CONTROL_PREFIX):
        return None
    try:
        obj = _decoder.decode(body.decode("utf-8"))
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    # Exactly these two keys: any other key (an id, a timestamp ...) must be
    # checked by decode(), which may refuse the frame.
    if type(obj) is not dict or len(obj) != 2 or "payload" not in obj:
        return None
    topic = obj["topic"]
    if type(topic) is not str or not _TOPIC_RE.fullmatch(topic) or len(topic) > 64:
        return None
    return topic, obj["payload"]


_json_string = json.JSONEncoder(ensure_ascii=False).encode


def _json_topic(topic: str) -> str:
    # A valid topic has no control characters; only '"' and '\\' need escapes.
    if '"' in topic or "\\" in topic:
        return _json_string(topic)
    return '"' + topic + '"'


def _interest_frame(added: List[str], removed: List[str]) -> bytes:
    """``_control_frame("$interest", {"add": added, "remove": removed})``, no empty list."""
    parts = []
    if added:
        parts.append('"add":[' + ",".join(map(_json_topic, added)) + "]")
    if removed:
        parts.append('"remove":[' + ",".join(map(_json_topic, removed)) + "]")
    body = ('{"topic":"$interest","payload":{' + ",".join(parts) + "}}").encode()
    return len(body).to_bytes(4, "big") + body


def _secret_key(secret: Any) -> Optional[bytes]:
    if secret is None:
        return None
    if isinstance(secret, str):
        secret = secret.encode("utf-8")
    if not isinstance(secret, (bytes, bytearray)) or not secret:
        raise TypeError("secret must be a non-empty str or bytes")
    return bytes(secret)


def _proof(key: bytes, label: bytes, first: bytes, second: bytes) -> bytes:
    import hashlib
    import hmac

    return hmac.new(key, label + first + second, hashlib.sha256).digest()


def _proof_matches(expected: bytes, given: Any) -> bool:
    import hmac

    if not isinstance(given, str) or len(given) != 2 * len(expected):
        return False
    try:
        raw = bytes.fromhex(given)
    except ValueError:
        return False
    return hmac.compare_digest(expected, raw)


def _nonce_from(value: Any) -> Optional[bytes]:
    if not isinstance(value, str) or not 32 <= len(value) <= 128:
        return None
    try:
        return bytes.fromhex(value)
    except ValueError:
        return None


def _ssl_module() -> Any:
    import ssl

    return ssl


_WOULD_BLOCK = (BlockingIOError, InterruptedError)
_TLS_WOULD_BLOCK: Tuple[Type[BaseException], ...] = _WOULD_BLOCK  # + ssl's, once used


def _would_block_errors(tls: bool) -> Tuple[Type[BaseException], ...]:
    global _TLS_WOULD_BLOCK
    if tls:
        ssl = _ssl_module()
        _TLS_WOULD_BLOCK = (BlockingIOError, InterruptedError,
                            ssl.SSLWantReadError, ssl.SSLWantWriteError)
        return _TLS_WOULD_BLOCK
    return _WOULD_BLOCK


def _describe_garbage(header: bytes) -> str:
    """Name the likely protocol behind a nonsensical length prefix."""
    if header[:1] == b"\x16" and header[1:2] == b"\x03":
        return " (this looks like a TLS ClientHello: the peer uses TLS, this port does not)"
    if header[:4] in (b"GET ", b"POST", b"HEAD", b"PUT ", b"OPTI", b"DELE", b"PATC", b"CONN"):
        return " (this looks like an HTTP request)"
    return ""


def _agreed_features(payload: Dict[str, Any]) -> frozenset:
    """The features a ``$hello`` or ``$welcome`` names that this module knows."""
    features = payload.get("features")
    if not isinstance(features, list):
        return frozenset()
    return frozenset(f for f in features if isinstance(f, str)) & _FEATURES


def _frame_limit(payload: Dict[str, Any]) -> Optional[int]:
    """The ``max_frame_size`` a ``$hello`` or ``$welcome`` names (None if absent or bad)."""
    limit = payload.get("max_frame_size")
    return limit if type(limit) is int and limit > 0 else None


def _peer_name(address: Any) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        host = address[0]
        return f"[{host}]:{address[1]}" if ":" in str(host) else f"{host}:{address[1]}"
    return str(address)


class _Connection:
    """One TCP peer: socket, decoder, protocol state, outbound queue (whole frames, ``lock``)."""

    __slots__ = (
        "sock", "peer", "id", "decoder", "tls", "lock", "out", "out_bytes",
        "max_outbound", "cur", "writing", "blocked", "closed", "state", "handshake",
        "features", "nonce", "peer_nonce", "opened", "last_recv", "frame_started",
        "ping_sent", "received", "acked", "interest", "events", "paused",
        "bytes_in", "last_push", "scheduled", "urgent", "implicit",
        "pending", "running", "queued", "caller_reading", "poller",
        "finished", "waiting", "counted", "peer_max_frame", "flushes",
        "frames_out", "bytes_out", "name", "started_at",
    )

    def __init__(
        self, sock: socket.socket, peer: str, max_frame_size: int, max_outbound: int, tls: bool
    ) -> None:
        self.sock = sock
        self.peer = peer
        self.id = next(_conn_ids)
        if tls:
            _would_block_errors(True)  # sets _TLS_WOULD_BLOCK for write()
        self.decoder = FrameDecoder(max_frame_size)
        self.tls = tls
        self.lock = threading.Lock()
        self.out: Deque[bytes] = collections.deque()
        self.out_bytes = 0
        self.max_outbound = max_outbound
        self.cur: Union[bytes, memoryview, None] = None  # being written (TLS retries it as is)
        self.writing = False
        self.blocked = False  # the kernel refused bytes: wait for EVENT_WRITE
        self.closed = False
        self.state = _TLS if tls else _NEW
        self.handshake = False  # True once the peer sent $hello
        self.features: frozenset = frozenset()
        self.nonce = b""
        self.peer_nonce = b""
        now = time.monotonic()
        self.opened = now
        self.last_recv = now
        self.frame_started: Optional[float] = None
        self.ping_sent = False
        self.received = 0  # data frames received (acknowledged with $ack)
        self.acked = 0
        self.interest: Dict[str, None] = {}
        self.events = 0
        self.paused = False
        self.bytes_in = 0
        self.last_push = 0.0
        self.scheduled = False  # a flush by the I/O thread is pending
        self.urgent = False  # client: a request waits in that flush
        self.implicit = False  # feature "reply": a request's inbox is implicit interest
        # dispatch="leader": handler calls not run yet, in arrival order; a
        # connection is run by one thread at a time (running), and waits in
        # the server's ready queue (queued) while no thread runs it.
        self.pending: Optional[Deque[Any]] = None
        self.running = False
        self.queued = False
        self.caller_reading = False  # client: a waiting caller reads the socket itself
        self.poller: Optional[select.poll] = None
        # Server, "acknowledge after handling": the numbers of the frames read
        # whose handler calls had not finished when last looked (loop thread
        # only), how many of those were since seen finished, and the finished
        # calls (counted by whichever thread ran them; one at a time).
        self.waiting: Optional[Deque[int]] = None  # set for peers with "ack" or "flush"
        self.counted = 0
        self.finished = 0
        self.peer_max_frame = _NO_PEER_LIMIT  # the largest frame the peer accepts
        self.flushes: Optional[Deque[Tuple[int, Any]]] = None  # ($flush seq, id) waiting
        # Read by the monitor: frames queued (control frames included) and
        # bytes the kernel took; the peer's name from its $hello.
        self.frames_out = 0
        self.bytes_out = 0
        self.name: Optional[str] = None
        self.started_at = time.time()

    def set_events(self, selector: selectors.BaseSelector, paused: bool = False) -> bool:
        """Register the events ``conn`` waits for (no read while ``paused``); False if unchanged."""
        import selectors

        events = 0 if (paused or self.paused) else selectors.EVENT_READ
        if self.blocked:
            events |= selectors.EVENT_WRITE
        if events == self.events:
            return False
        if self.events == 0:
            selector.register(self.sock, events, self)
        elif events == 0:
            selector.unregister(self.sock)
        else:
            selector.modify(self.sock, events, self)
        self.events = events
        return True

    def recv(self) -> bytes:
        """Read what is available; with TLS, also the records already decrypted."""
        sock = self.sock
        data = sock.recv(_RECV_SIZE)
        if self.tls and data:
            while sock.pending():  # type: ignore[attr-defined]  # an ssl.SSLSocket
                data += sock.recv(_RECV_SIZE)
        return data

    def enqueue(self, data: bytes) -> int:
        """Append one or more whole frames; report _OK, _CLOSED or _OVERFLOW."""
        with self.lock:
            if self.closed:
                return _CLOSED
            size = len(data)
            if self.out_bytes + size > self.max_outbound:
                return _OVERFLOW
            self.out.append(data)
            self.out_bytes += size
            self.frames_out += 1
            return _OK

    def write(self) -> Optional[bool]:
        """Send queued bytes without blocking: True all sent, False kernel buffer full.

        None when another thread is writing or the connection is closed; OSError if it broke.
        """
        with self.lock:
            if self.writing or self.closed:
                return None
            data = self.cur
            if data is None:
                out = self.out
                if not out:
                    return True
                data = self.cur = out.popleft() if len(out) == 1 else b"".join(out)
                out.clear()
            self.writing = True
        return self.write_claimed(data)

    def claim(self, data: bytes, now: float) -> bool:
        """With ``lock`` held: if idle (:meth:`defer` would say _WRITE_NOW), become
        the writer of ``data``, not queued; then call :meth:`write_claimed`."""
        if (self.writing or self.out or self.cur is not None or self.blocked or self.tls
                or self.scheduled or self.closed or now - self.last_push < _HOT_GAP):
            return False
        self.last_push = now
        self.writing = True
        self.cur = data
        self.out_bytes += len(data)
        return True

    def write_claimed(self, data: bytes) -> Optional[bool]:
        """:meth:`write` once this thread is the writer (``writing`` set, ``cur`` is ``data``)."""
        lock = self.lock
        sock = self.sock
        would_block = _TLS_WOULD_BLOCK if self.tls else _WOULD_BLOCK
        try:
            while True:
                try:
                    sent = sock.send(data)
                except would_block:
                    sent = 0
                with lock:
                    self.out_bytes -= sent
                    self.bytes_out += sent
                    if sent == len(data):
                        out = self.out
                        if not out:
                            self.cur = None
                            self.writing = False
                            self.blocked = False
                            return True
                        data = self.cur = out.popleft() if len(out) == 1 else b"".join(out)
                        out.clear()
                        continue
                    if sent:
                        self.cur = memoryview(data)[sent:] if not self.tls else data
                    self.writing = False
                    self.blocked = True
                    return False
        except BaseException:
            with lock:
                self.writing = False
            raise

    def defer(self) -> int:
        """Decide who writes a frame just queued by a sending thread.

        _WRITE_NOW when the connection was idle (no thread hop); while frames follow closer
        than ``_HOT_GAP``, _WRITE_SCHEDULE once (the caller wakes the I/O thread) and then
        _WRITE_PENDING: a busy sender pays no syscall and the I/O thread writes batches.
        """
        now = _perf_counter()
        hot = now - self.last_push < _HOT_GAP
        self.last_push = now
        if self.scheduled:
            return _WRITE_PENDING
        if hot:
            self.scheduled = True
            return _WRITE_SCHEDULE
        return _WRITE_NOW

    def snapshot(self) -> Dict[str, Any]:
        """What a monitor shows of this connection: counters and times, never payloads."""
        with self.lock:
            pending, frames_out, bytes_out = self.out_bytes, self.frames_out, self.bytes_out
        return {
            "cid": self.id, "peer": self.peer, "name": self.name, "start": self.started_at,
            "last_activity": self.started_at + (self.last_recv - self.opened),
            "pending_bytes": pending, "in_msgs": self.received, "in_bytes": self.bytes_in,
            "out_frames": frames_out, "out_bytes": bytes_out,
            "subscriptions": len(self.interest), "handshake": self.handshake, "tls": self.tls,
        }


_EPOLL_MASKS: Dict[Tuple[int, bool], int] = {}


def _epoll_mask(events: int, read: bool) -> int:
    """The epoll mask of selector ``events``, with or without input."""
    mask = _EPOLL_MASKS.get((events, read))
    if mask is None:
        import select

        mask = select.EPOLLOUT if events & 2 else 0  # selectors.EVENT_WRITE
        if read and events & 1:  # selectors.EVENT_READ
            mask |= select.EPOLLIN
        _EPOLL_MASKS[(events, read)] = mask
    return mask


class _TCPEndpoint(Transport):
    """What both ends of an eventforge TCP connection do; subclassed by the server and client.

    The transport methods pass through to a local :class:`MemoryTransport` (``_local``); on
    top: writing, reading and decoding frames, pings and the dead-peer check, one selector
    event.  Subclasses provide ``_local``, ``_loop``, ``ping_interval`` and the hooks below:
    the base calls, the subclass decides (socketserver style).
    """

    _local: MemoryTransport
    _loop: Optional[_Loop]
    ping_interval: Optional[float]
    _log_name = "tcp"  # "tcp server" / "tcp client" in log lines
    _hold_bursts = False  # the client lets a publisher's burst grow (_scheduled_flush)
    _closed = False

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    # -- Transport API: the local transport ---------------------------------------

    def receive(self, topic: str, timeout: Optional[float] = None) -> Optional[Message]:
        """Take the next message on the exact ``topic`` (published here or by a peer)."""
        return self._local.receive(topic, timeout)

    async def receive_async(self, topic: str, timeout: Optional[float] = None) -> Optional[Message]:
        """Asyncio-native :meth:`receive`."""
        return await self._local.receive_async(topic, timeout)

    def subscribe(self, topic: str, callback: Callable[[Message], Any]) -> str:
        """Call ``callback`` for messages matching ``topic``, local or from peers."""
        return self._subscribed(topic, self._local.subscribe(topic, callback))

    def subscribe_handler(
        self,
        topic: str,
        handler: Callable[[Message], Any],
        on_error: Callable[[Any, Message, BaseException], Any],
    ) -> str:
        """Subscribe ``handler``, routing its exceptions to ``on_error``."""
        return self._subscribed(topic, self._local.subscribe_handler(topic, handler, on_error))

    def unsubscribe(self, subscription_id: str) -> bool:
        """Remove a subscription; return False if the id is unknown."""
        if not self._local.unsubscribe(subscription_id):
            return False
        self._unsubscribed(subscription_id)
        return True

    def _subscribed(self, pattern: str, subscription_id: str) -> str:
        # Hook: a subscription was added (the client tells its server).
        return subscription_id

    def _unsubscribed(self, subscription_id: str) -> None:
        # Hook: a subscription was removed.
        pass

    def open_inbox(self, topic: str) -> Inbox:
        """Open an inbox on the exact ``topic`` (replies from peers land here)."""
        return self._local.open_inbox(topic)

    # -- writing ------------------------------------------------------------------

    def _kick(self, conn: _Connection) -> None:
        """Get ``conn``'s queued frames written (any thread).

        An idle connection is written at once by the caller (no thread hop); frames following
        each other closely, and any TLS socket, are left to the I/O thread, which batches.
        """
        loop = self._loop
        if loop is None:
            return
        if loop.in_loop():
            self._write_on_loop(conn)
        elif conn.tls:
            if not conn.scheduled:
                conn.scheduled = True
                loop.call_soon(lambda: self._scheduled_flush(conn))
        elif not conn.blocked:
            decision = conn.defer()
            if decision == _WRITE_NOW:
                self._flush(conn)
            elif decision == _WRITE_SCHEDULE:
                loop.call_soon(lambda: self._scheduled_flush(conn))

    def _scheduled_flush(self, conn: _Connection) -> None:
        hold = self._hold_bursts and not conn.tls
        if hold:
            self._let_burst_grow(conn)
        conn.scheduled = False
        conn.urgent = False
        if self._live(conn):
            self._flush(conn)
            if hold:  # a sender that was only waiting for the GIL is still in its burst
                conn.last_push = _perf_counter()

    @staticmethod
    def _let_burst_grow(conn: _Connection) -> None:
        # While the sender keeps queueing (frames closer than _HOT_GAP), let
        # the burst grow (up to _BURST_HOLD, _BURST_BYTES): one write, not one
        # per few frames with two syscalls and two GIL hand-offs each.  Each
        # sleep hands the GIL to the sender; a request does not wait.
        started = _perf_counter()
        while not conn.urgent and conn.out_bytes < _BURST_BYTES:
            now = _perf_counter()
            if now - conn.last_push >= _HOT_GAP or now - started >= _BURST_HOLD:
                return
            time.sleep(_HOT_GAP)

    def _flush(self, conn: _Connection, claimed: Optional[bytes] = None) -> None:
        """Write ``conn``'s queue (or the frame ``claimed`` with :meth:`_Connection.claim`)
        now; arrange EVENT_WRITE if the kernel is full."""
        loop = self._loop
        assert loop is not None
        try:
            done = conn.write() if claimed is None else conn.write_claimed(claimed)
        except OSError as exc:
            self._write_failed(conn, exc)
            return
        if done is False:
            if loop.in_loop():
                self._update_events(conn)
            else:
                loop.call_soon(lambda: self._update_events(conn))

    def _on_writable(self, conn: _Connection) -> None:
        conn.blocked = False
        self._flush(conn)
        if not conn.blocked:
            self._update_events(conn)

    # -- reading ------------------------------------------------------------------

    def _serve_event(self, conn: _Connection, mask: int) -> None:
        """Handle one selector event of ``conn`` (loop thread); a bug closes only ``conn``."""
        try:
            if mask & 2:  # selectors.EVENT_WRITE
                self._on_writable(conn)
            if mask & 1 and self._may_read(conn):  # selectors.EVENT_READ
                self._on_readable(conn)
        except Exception:
            logger.exception("%s: internal error on %s", self._log_name, conn.peer)
            self._internal_error(conn)

    def _read_what_is_left(self, conn: _Connection, read: Callable[[], Any]) -> None:
        """A write to ``conn`` failed (loop thread): ``read()`` what the peer sent before it went.

        A peer closing with our frames unread resets the connection, yet what it sent first is
        still readable: its last ``$ack``, or a bad frame whose reason is then logged rather
        than a reset.  Bounded to a few receive buffers; ``read()`` returning False stops it.
        """
        if conn.tls:
            return
        import select

        for _ in range(64):
            if not self._live(conn) or conn.closed:
                return
            try:
                if not select.select([conn.sock], [], [], 0)[0]:
                    return
            except (OSError, ValueError):
                return
            if read() is False:
                return

    def _read_frames(self, conn: _Connection) -> Optional[List[bytes]]:
        """``conn``'s newly arrived frame bodies; None once it ended (the hooks were told why)."""
        try:
            data = conn.recv()
        except _would_block_errors(conn.tls):
            return []
        except OSError as exc:
            self._read_failed(conn, exc)
            return None
        if not data:
            self._peer_closed(conn)
            return None
        now = time.monotonic()
        conn.last_recv = now
        conn.ping_sent = False
        conn.bytes_in += len(data)
        self._bytes_read(len(data))
        try:
            bodies = conn.decoder.feed(data)
        except FrameTooLargeError as exc:
            self._oversize(conn, exc, data)
            return None
        if conn.decoder.buffered == 0:
            conn.frame_started = None
        elif bodies or conn.frame_started is None:
            conn.frame_started = now
        return bodies

    def _on_frame(
        self, conn: _Connection, body: bytes, batch: Optional[List[Any]] = None
    ) -> None:
        """Decode one frame body: a control frame, a message or garbage."""
        control = _fast_control(body)
        if control is not None:
            self._on_control(conn, control[0], control[1])
            return
        try:
            message = decode(body)
        except FrameError as exc:
            self._bad_frame(conn, exc)
            return
        topic = message.topic
        if topic[0] == "$":
            self._on_control(conn, topic, message.payload)
        else:
            self._on_message(conn, message, body, batch)

    # -- pings --------------------------------------------------------------------

    def _check_alive(self, conn: _Connection, now: float) -> bool:
        """Ping a quiet peer, give up on a silent one; False if ``conn`` was given up."""
        interval = self.ping_interval
        if interval and conn.handshake and "ping" in conn.features:
            silent = now - conn.last_recv
            if silent > 2 * interval:
                self._dead(conn, f"dead peer: nothing received for {silent:.1f} s")
                return False
            if silent > interval and not conn.ping_sent:
                conn.ping_sent = True
                self._send_ping(conn)
        return True

    # -- closing ------------------------------------------------------------------

    def _close_socket(self, conn: _Connection) -> None:
        """Take ``conn``'s socket out of the selector and close it (loop thread)."""
        if conn.events:
            try:
                self._loop.selector.unregister(conn.sock)  # type: ignore[union-attr]
            except (KeyError, ValueError, OSError):
                pass
            conn.events = 0
        try:
            conn.sock.close()
        except OSError:
            pass

    def _dispatch_low(self) -> None:
        # The handler backlog went down: read again (on the loop thread).
        loop = self._loop
        if loop is not None:
            loop.call_soon(self._resume_reading)

    # -- hooks: what each side does (the subclass defines them) ---------------------

    _live: Callable[[_Connection], bool]  # a flush scheduled for conn is still wanted
    _write_on_loop: Callable[[_Connection], None]  # queued on the I/O thread: write now/batched
    _write_failed: Callable[[_Connection, OSError], None]
    _update_events: Callable[[_Connection], None]  # register the events conn waits for
    _may_read: Callable[[_Connection], bool]  # whether (and then how) to read on EVENT_READ
    _on_readable: Callable[[_Connection], Any]
    _internal_error: Callable[[_Connection], None]  # a bug while serving conn (logged)
    _read_failed: Callable[[_Connection, OSError], None]  # the connection ended ...
    _peer_closed: Callable[[_Connection], None]
    _oversize: Callable[[_Connection, FrameTooLargeError, bytes], None]  # ``exc.frames``: before
    _bad_frame: Callable[[_Connection, FrameError], None]  # what a frame turned out to be ...
    _on_control: Callable[[_Connection, str, Any], None]
    _on_message: Callable[[_Connection, Message, bytes, Optional[List[Any]]], None]
    _dead: Callable[[_Connection, str], None]  # silent for two ping intervals
    _send_ping: Callable[[_Connection], None]
    _resume_reading: Callable[[], None]  # the handler backlog went down

    def _bytes_read(self, size: int) -> None:
        pass


class _Routes:
    """A server's routing table: the connections a message on a topic goes to.

    ``broadcast``: frame-only peers (all but inbox messages).  Written by the loop thread,
    read by any without a lock: values are replaced, never mutated.
    """

    __slots__ = ("exact", "patterns", "broadcast")

    def __init__(self) -> None:
        self.exact: Dict[str, Tuple[_Connection, ...]] = {}
        self.patterns = SubscriptionTrie()
        self.broadcast: Tuple[_Connection, ...] = ()

    def targets(self, topic: str, origin: Optional[_Connection]) -> Tuple[List[_Connection], bool]:
        """Connections a message on ``topic`` goes to, and whether there are any."""
        if not self.broadcast and topic not in self.exact and not len(self.patterns):
            return [], False  # nothing to route to (a reply to a local requester, say)
        targets = list(self.exact.get(topic, ()))
        if topic.startswith(INBOX_PREFIXES):
            # An inbox is private: it goes only to the connection whose request
            # opened it, or that named this exact topic; no pattern matches it
            # and frame-only peers do not get it.
            if targets:
                targets = [conn for conn in targets if not conn.closed]
            return targets, bool(targets)
        if len(self.patterns):
            matched = self.patterns.match(topic)
            if matched:
                if targets:
                    seen = {c.id for c in targets}
                    for conn in matched:
                        if conn.id not in seen:
                            seen.add(conn.id)
                            targets.append(conn)
                else:
                    targets = list({c.id: c for c in matched}.values())
        for conn in self.broadcast:
            if conn is not origin:
                targets.append(conn)
        if targets:
            # A connection being dropped on the I/O thread is marked closed
            # before its routes go; handler threads may route meanwhile.
            targets = [conn for conn in targets if not conn.closed]
        return targets, bool(targets)

    def add(self, conn: _Connection, pattern: str) -> None:
        """Route ``pattern`` (an exact topic or a wildcard pattern, valid) to ``conn``."""
        if "*" in pattern:
            self.patterns.add((conn.id, pattern), pattern, conn)
        else:
            self.exact[pattern] = self.exact.get(pattern, ()) + (conn,)

    def remove(self, conn: _Connection, pattern: str) -> None:
        """Stop routing ``pattern`` to ``conn``."""
        if "*" in pattern:
            self.patterns.remove((conn.id, pattern))
        else:
            left = tuple(c for c in self.exact.get(pattern, ()) if c is not conn)
            if left:
                self.exact[pattern] = left
            else:
                self.exact.pop(pattern, None)

    def add_frame_peer(self, conn: _Connection) -> None:
        """Route everything but inboxes to ``conn`` (maybe a 0.1 client) until its ``$hello``."""
        self.broadcast = self.broadcast + (conn,)
        conn.implicit = True

    def remove_broadcast(self, conn: _Connection) -> None:
        if conn in self.broadcast:
            self.broadcast = tuple(c for c in self.broadcast if c is not conn)

    def forget(self, conn: _Connection) -> None:
        """Remove every route to ``conn`` (it closes) and clear its interest."""
        self.remove_broadcast(conn)
        for pattern in conn.interest:
            self.remove(conn, pattern)
        conn.interest.clear()

    def debug_state(self) -> Dict[str, Any]:
        return {
            "exact": {topic: len(conns) for topic, conns in list(self.exact.items())},
            "patterns": len(self.patterns),
            "frame_peers": len(self.broadcast),
        }


class _ServerWriter:
    """Queues frames for a server's connections and gets them written.

    ``dirty``: queued on the I/O thread, written once per loop iteration.  Over
    ``max_outbound_bytes`` queued closes a slow consumer.
    Locks, outermost first: ``_fanout_lock``, a connection's lock.
    """

    def __init__(self, server: TCPServerTransport) -> None:
        self._server = server
        self.dirty: Dict[int, _Connection] = {}  # queued on the loop thread, to flush
        self._fanout: Dict[int, _Connection] = {}  # queued by other threads, to flush
        self._fanout_lock = threading.Lock()
        self._oversize_log = _LogLimiter()

    def push(self, conn: _Connection, frame: bytes) -> None:
        """Queue ``frame`` for ``conn`` and get it written (any thread)."""
        if len(frame) - 4 > conn.peer_max_frame:
            self._too_large_for(conn, frame)
            return
        result = conn.enqueue(frame)
        if result == _OK:
            self._server._kick(conn)
        elif result == _OVERFLOW:
            self._overflowed(conn)

    def _overflowed(self, conn: _Connection) -> None:
        self._server._close_later(
            conn, "slow_consumers",
            f"slow consumer: {conn.out_bytes} bytes already queued, "
            f"max_outbound_bytes={self._server.max_outbound_bytes}",
        )

    def _too_large_for(self, conn: _Connection, frame: bytes) -> None:
        # Never send a peer more than the max_frame_size it announced in
        # $hello: it would have to close the connection.  The frame is dropped
        # for this peer only; the connection stays.
        self._server._count("oversize_for_peer")
        self._oversize_log.log(
            "tcp server: dropped a %d-byte frame for %s: over the max_frame_size=%d it accepts",
            len(frame) - 4, conn.peer, conn.peer_max_frame)

    def push_many(self, targets: List[_Connection], frame: bytes) -> None:
        """Fan-out from any thread: queue everywhere, one wake-up for the I/O thread to write."""
        loop = self._server._loop
        assert loop is not None
        if loop.in_loop():
            for conn in targets:
                self.push(conn, frame)
            return
        with self._fanout_lock:
            pending = self._fanout
            schedule = not pending
            for conn in targets:
                if len(frame) - 4 > conn.peer_max_frame:
                    self._too_large_for(conn, frame)
                    continue
                result = conn.enqueue(frame)
                if result == _OK:
                    pending[conn.id] = conn
                elif result == _OVERFLOW:
                    self._overflowed(conn)
        if schedule:
            loop.call_soon(self._flush_fanout)

    def _flush_fanout(self) -> None:
        with self._fanout_lock:
            pending, self._fanout = self._fanout, {}
        for conn in pending.values():
            if not conn.closed and not conn.blocked:
                self._server._flush(conn)

    def flush_dirty(self) -> None:
        dirty = self.dirty
        while dirty:
            conn = dirty.popitem()[1]
            if not conn.closed:
                self._server._flush(conn)

    def write_out(self, conns: List[_Connection], deadline: float) -> None:
        """Write what ``conns`` have queued, waiting until ``deadline`` at most (closing)."""
        import selectors

        pending = [c for c in conns if c.out_bytes and not c.closed]
        while pending and time.monotonic() < deadline:
            for conn in pending:
                self._server._flush(conn)
            pending = [c for c in pending if c.out_bytes and not c.closed]
            if pending:
                try:
                    waiting = selectors.DefaultSelector()
                    for conn in pending:
                        waiting.register(conn.sock, selectors.EVENT_WRITE)
                    waiting.select(max(0.0, deadline - time.monotonic()))
                    waiting.close()
                except (OSError, ValueError):
                    break


class _Listener:
    """A server's listening socket: binding it and accepting connections (loop thread).

    A failed accept() (out of file descriptors ...) stops watching the socket until the next
    tick instead of spinning.
    """

    def __init__(self, server: TCPServerTransport) -> None:
        self._server = server
        self.sock: Optional[socket.socket] = None
        self.address: Tuple[str, int] = (server.host, server._port)
        self.paused = False  # accepts paused after a failure, until the next tick

    def bind(self, selector: selectors.BaseSelector) -> None:
        """Listen on the server's host and port, watched by ``selector``."""
        import selectors
        import socket

        server = self._server
        try:
            family = socket.AF_INET6 if ":" in server.host else socket.AF_INET
            sock = socket.create_server((server.host, server._port), family=family,
                                        backlog=server.backlog)
        except OSError as exc:
            where = f"{server.host}:{server._port}"
            raise ConnectionLostError(f"cannot listen on {where}: {exc}") from exc
        sock.setblocking(False)
        self.sock = sock
        self.address = tuple(sock.getsockname()[:2])
        selector.register(sock, selectors.EVENT_READ, self)

    def resume(self, selector: selectors.BaseSelector) -> None:
        """Watch the socket again after a failed accept paused it."""
        import selectors

        self.paused = False
        selector.register(self.sock, selectors.EVENT_READ, self)  # type: ignore[arg-type]

    def close(self, selector: Optional[selectors.BaseSelector] = None) -> None:
        """Stop listening (and watching, with ``selector``); safe to call twice."""
        sock = self.sock
        if sock is None:
            return
        if selector is not None:
            try:
                selector.unregister(sock)
            except (KeyError, ValueError):
                pass
        try:
            sock.close()
        except OSError:
            pass

    def accept(self) -> None:
        """Accept the connections waiting (at most 256 at a time)."""
        import socket

        server = self._server
        listener = self.sock
        assert listener is not None
        for _ in range(256):
            try:
                sock, address = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. EMFILE: log, keep serving the others
                server._count("accept_errors")
                logger.error("tcp server: accept failed: %s; pausing accepts for 0.25 s", exc)
                try:  # it stays readable: stop watching it until the next tick
                    server._loop.selector.unregister(listener)  # type: ignore[union-attr]
                    self.paused = True
                except (KeyError, ValueError):
                    pass
                return
            peer = _peer_name(address)
            if server._reads_stopped.is_set():
                sock.close()
                continue
            if len(server._conns) >= server.max_connections:
                server._count("refused_connections")
                logger.warning("tcp server: refused %s: max_connections=%d reached",
                               peer, server.max_connections)
                if server.ssl_context is None:
                    try:
                        sock.setblocking(False)
                        sock.send(_control_frame("$error", {
                            "code": "full", "reason": "server is at max_connections"}))
                    except OSError:
                        pass
                sock.close()
                continue
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                context = server.ssl_context
                tls = context is not None
                if context is not None:
                    sock = context.wrap_socket(sock, server_side=True,
                                               do_handshake_on_connect=False)
            except OSError as exc:
                sock.close()
                server._count("accept_errors")
                logger.warning("tcp server: could not set up %s: %s", peer, exc)
                continue
            limit = _HANDSHAKE_MAX_FRAME if server._key is not None else server.max_frame_size
            conn = _Connection(sock, peer, limit, server.max_outbound_bytes, tls)
            server._conns[conn.id] = conn
            server._count("accepted")
            if not tls and server.allow_frame_only:
                server._routes.add_frame_peer(conn)
            server._update_events(conn)
            if tls:
                server._protocol.tls_handshake(conn)


class _ServerProtocol:
    """The server's side of the wire protocol (loop thread): handshakes, control frames, acks."""

    def __init__(self, server: TCPServerTransport) -> None:
        self._server = server
        # Connections whose handled frames are to be reported by ``ack_at``.
        self.ack_due: Dict[int, _Connection] = {}
        self.ack_at = 0.0

    def tls_handshake(self, conn: _Connection) -> None:
        server = self._server
        ssl = _ssl_module()
        try:
            conn.sock.do_handshake()  # type: ignore[attr-defined]  # an ssl.SSLSocket
        except ssl.SSLWantReadError:
            if conn.blocked:
                conn.blocked = False
                server._update_events(conn)
            return
        except ssl.SSLWantWriteError:
            conn.blocked = True
            server._update_events(conn)
            return
        except (ssl.SSLError, OSError) as exc:
            server._drop(conn, "tls_failures", f"TLS handshake failed: {exc}")
            return
        conn.state = _NEW
        conn.blocked = False
        server._update_events(conn)
        if server.allow_frame_only:
            server._routes.add_frame_peer(conn)

    def in_time(self, conn: _Connection, now: float) -> bool:
        """Drop ``conn`` if its handshake or current frame takes too long; True if it may go on."""
        server = self._server
        if conn.state != _READY and (conn.state == _TLS or server._key is not None
                                     or conn.handshake or not server.allow_frame_only):
            if now - conn.opened > server.handshake_timeout:
                server._drop(conn, "handshake_timeouts",
                             f"handshake not completed within {server.handshake_timeout} s")
            return False
        timeout = server.frame_timeout
        if (timeout is not None and conn.frame_started is not None
                and now - conn.frame_started > timeout):
            server._drop(conn, "frame_timeouts",
                         f"incomplete frame for more than {timeout} s "
                         f"(slow sender; {conn.decoder.buffered} bytes received)")
            return False
        return True

    def on_control(self, conn: _Connection, topic: str, payload: Any) -> None:
        server = self._server
        if not isinstance(payload, dict):
            payload = {}
        state = conn.state
        if topic == "$hello" and state == _NEW and not conn.handshake:
            self.on_hello(conn, payload)
        elif topic == "$auth" and state == _AUTH:
            self.on_auth(conn, payload)
        elif state != _READY:
            server._drop(conn, "protocol_errors" if server._key is None else "auth_failures",
                         f"unexpected {topic!r} frame during the handshake")
        elif topic == "$ping":
            server._push(conn, _control_frame("$pong", {}))
        elif topic == "$pong":
            pass
        elif topic == "$interest" and conn.handshake:
            self.on_interest(conn, payload)
        elif topic == "$flush" and "flush" in conn.features:
            self.on_flush(conn, payload)
        else:
            self.ignored("ignored unknown control frame %r from %s", topic, conn.peer)

    def ignored(self, what: str, *args: Any) -> None:
        """Count and log (``what % args``) a protocol error that leaves the connection open."""
        self._server._count("protocol_errors")
        logger.warning("tcp server: " + what, *args)

    def on_hello(self, conn: _Connection, payload: Dict[str, Any]) -> None:
        server = self._server
        version = payload.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            self.refuse(conn, "protocol_errors", "protocol",
                        f"unsupported handshake version {version!r:.40}")
            return
        conn.features = _agreed_features(payload)
        conn.peer_max_frame = _frame_limit(payload) or _NO_PEER_LIMIT
        name = payload.get("name")
        if isinstance(name, str):  # optional: shown by a monitor
            conn.name = name[:_MAX_PEER_NAME]
        conn.handshake = True
        if conn.features & _PROGRESS_FEATURES:
            conn.waiting = collections.deque()
        if "interest" in conn.features:  # else it keeps receiving everything
            server._routes.remove_broadcast(conn)
            conn.implicit = "reply" in conn.features
        else:  # like a frame-only peer: its requests' inboxes are routed to it
            conn.implicit = True
        welcome: Dict[str, Any] = {
            "version": PROTOCOL_VERSION,
            "features": sorted(conn.features),
            "auth": None,
            "max_frame_size": server.max_frame_size,
            "ping_interval": server.ping_interval,
        }
        if server._key is not None:
            nonce = _nonce_from(payload.get("nonce"))
            if nonce is None:
                self.refuse(conn, "auth_failures", "auth",
                            "authentication required: $hello carried no valid nonce")
                return
            conn.peer_nonce = nonce
            conn.nonce = os.urandom(32)
            welcome["auth"] = "hmac-sha256"
            welcome["nonce"] = conn.nonce.hex()
            conn.state = _AUTH
        else:
            conn.state = _READY
        server._push(conn, _control_frame("$welcome", welcome))

    def on_auth(self, conn: _Connection, payload: Dict[str, Any]) -> None:
        server = self._server
        key = server._key
        assert key is not None
        expected = _proof(key, _AUTH_LABEL_CLIENT, conn.peer_nonce, conn.nonce)
        if not _proof_matches(expected, payload.get("proof")):
            self.refuse(conn, "auth_failures", "auth", "authentication failed: wrong secret")
            return
        conn.state = _READY
        conn.decoder.max_frame_size = server.max_frame_size
        proof = _proof(key, _AUTH_LABEL_SERVER, conn.nonce, conn.peer_nonce)
        server._push(conn, _control_frame("$ready", {"proof": proof.hex()}))

    def refuse(self, conn: _Connection, counter: str, code: str, reason: str) -> None:
        """Tell a handshaking peer why it is refused, then close it."""
        server = self._server
        if conn.enqueue(_control_frame("$error", {"code": code, "reason": reason})) == _OK:
            try:
                conn.write()
            except OSError:
                pass
        server._drop(conn, counter, reason)

    def on_interest(self, conn: _Connection, payload: Dict[str, Any]) -> None:
        server = self._server
        added = payload.get("add") or []
        removed = payload.get("remove") or []
        if not isinstance(added, list) or not isinstance(removed, list):
            self.ignored("malformed $interest from %s", conn.peer)
            return
        for pattern in removed:
            if isinstance(pattern, str) and pattern in conn.interest:
                del conn.interest[pattern]
                server._routes.remove(conn, pattern)
        for pattern in added:
            if not isinstance(pattern, str) or pattern in conn.interest:
                continue
            try:
                if "*" in pattern:
                    validate_pattern(pattern)
                else:
                    validate_topic(pattern)
            except TopicError as exc:
                self.ignored("ignored interest from %s: %s", conn.peer, exc)
                continue
            if len(conn.interest) >= server.max_interest:
                self.ignored("%s exceeds max_interest=%d; ignored %r",
                             conn.peer, server.max_interest, pattern)
                continue
            conn.interest[pattern] = None
            server._routes.add(conn, pattern)
            if "*" not in pattern and not pattern.startswith(INBOX_PREFIXES):
                    self.hand_mailbox(conn, pattern)

    def on_flush(self, conn: _Connection, payload: Dict[str, Any]) -> None:
        # Feature "flush": answer $flushed once every frame read before this
        # one was handled; $interest frames were applied when read.
        flush_id = payload.get("id")
        if type(flush_id) is not int:
            self.ignored("ignored $flush from %s: id must be an int, not %.40r",
                         conn.peer, flush_id)
            return
        flushes = conn.flushes
        if flushes is None:
            flushes = conn.flushes = collections.deque()
        if len(flushes) >= _MAX_FLUSHES:
            self.ignored("ignored $flush from %s: %d already wait", conn.peer, len(flushes))
            return
        flushes.append((conn.received, flush_id))
        if not self.report_progress(conn):
            self.progress_due(conn)

    def implicit_interest(self, conn: _Connection, topic: str) -> None:
        # Feature "reply": a request naming an inbox topic as its reply_to
        # adds that topic to its connection's interest, as if an $interest
        # add had come just before it (the client withdraws it as usual).
        server = self._server
        if len(topic) > MAX_TOPIC_LENGTH or _TOPIC_RE.fullmatch(topic) is None:
            self.ignored("ignored reply_to %r from %s: not a valid topic", topic[:80], conn.peer)
            return
        if len(conn.interest) >= server.max_interest:
            if "interest" not in conn.features:
                # A peer that cannot withdraw routes (frame-only): forget the
                # oldest inbox, long answered or given up by now.
                oldest = next(iter(conn.interest))
                del conn.interest[oldest]
                server._routes.remove(conn, oldest)
            else:
                self.ignored("%s exceeds max_interest=%d; ignored reply_to %r",
                             conn.peer, server.max_interest, topic)
                return
        conn.interest[topic] = None
        server._routes.add(conn, topic)

    def hand_mailbox(self, conn: _Connection, topic: str) -> None:
        # Messages nobody had taken wait in the server's mailbox; the first
        # client to show interest in that topic takes them (send-then-receive).
        server = self._server
        for message in server._local._drain_mailbox(topic):
            try:
                server._push(conn, encode(message, max_frame_size=server.max_frame_size))
            except (FrameError, SerializationError):  # pragma: no cover - checked at send
                pass

    def handled_upto(self, conn: _Connection) -> int:
        """How many of ``conn``'s data frames were routed on and their callbacks ran (in order)."""
        waiting = conn.waiting
        done = conn.finished - conn.counted
        while done > 0 and waiting:
            waiting.popleft()
            conn.counted += 1
            done -= 1
        return waiting[0] - 1 if waiting else conn.received

    def report_progress(self, conn: _Connection) -> bool:
        """Send the ``$ack``/``$flushed`` ``conn``'s handled frames allow; True if none is due."""
        server = self._server
        handled = self.handled_upto(conn)
        acks = "ack" in conn.features
        if acks and handled != conn.acked:
            conn.acked = handled
            server._push(conn, _control_frame("$ack", {"n": handled}))
        flushes = conn.flushes
        while flushes and flushes[0][0] <= handled:
            server._push(conn, _control_frame("$flushed", {"id": flushes.popleft()[1]}))
        return not flushes and (handled == conn.received or not acks)

    def progress_due(self, conn: _Connection) -> None:
        # Look at ``conn`` again within _ACK_DELAY (its handlers are still running).
        if not self.ack_due:
            self.ack_at = _monotonic() + _ACK_DELAY
        self.ack_due[conn.id] = conn

    def send_acks(self) -> None:
        due, self.ack_due = self.ack_due, {}
        for conn in due.values():
            if not conn.closed and not self.report_progress(conn):
                self.progress_due(conn)


class _DispatchMode:
    """How a :class:`TCPServerTransport` runs the subscriber callbacks of network messages.

    One per server (its ``dispatch`` argument): :meth:`submit`, :meth:`drain`, :meth:`stop`
    and ``backlog`` (calls not started).  The defaults suit a mode without threads (inline).
    """

    runs_on_loop = False  # True: callbacks run on the I/O thread itself
    ready: Sequence[_Connection] = ()  # connections with calls for the loop thread (leader)
    backlog = 0

    def __init__(self, server: TCPServerTransport) -> None:
        self._server = server
        self.discard = False  # closing: handler calls not started are skipped
        self._expired_log = _LogLimiter()

    def call(self, subscriptions: Tuple[Any, ...], message: Message,
                       expires: float, conn: _Connection) -> None:
        """Run the local callbacks of one message read from ``conn``.

        Whatever they raise is a failure of that call only (logged and counted by the local
        delivery), never of the thread running it.  A request whose ``_ttl_ms`` ran out since it
        was read is skipped.  A call that completes counts towards ``conn``'s acknowledgements;
        while closing, calls not started are skipped *without* counting, so their frames stay
        unacknowledged and the client sends them again.
        """
        if self.discard:
            return
        if expires and _monotonic() > expires:
            self._server._count("expired")
            self._expired_log.log(
                "tcp server: skipped request %s on %r from %s: its _ttl_ms ran out "
                "before a handler was free", message.id, message.topic, conn.peer)
        else:
            try:
                self._server._local._run_subscriptions(subscriptions, message)
            except BaseException:  # an on_error hook failed: still this call's failure only
                self._server._count("internal_errors")
                logger.exception("tcp server: error handler failed for %s", message.id)
        conn.finished += 1

    def serve(self) -> None:
        """The I/O thread's body (the loop thread calls it once)."""
        self._server._lead()

    def submit(self, conn: _Connection, batch: List[_Call], may_run_here: bool = False) -> bool:
        """Hand over ``batch`` read from ``conn``; True: run it yourself with :meth:`run_here`."""
        raise NotImplementedError

    def run_here(self, conn: _Connection, batch: List[_Call]) -> None:  # pragma: no cover
        """Run ``batch`` on the loop thread (after :meth:`submit` said True)."""
        raise NotImplementedError

    def run_ready(self) -> bool:
        """Loop thread: run what :attr:`ready` holds; False if it lost the loop meanwhile."""
        return True

    def drain(self, deadline: float) -> bool:
        """Wait until every call handed over has run; False if ``deadline`` passed first."""
        return True

    def stop(self, deadline: float) -> List[threading.Thread]:
        """End the mode's threads (by ``deadline``); return the threads to join."""
        loop = self._server._loop
        return [loop.thread] if loop is not None and loop.thread is not None else []

    def join(self, deadline: float) -> None:
        """:meth:`stop`, then join the threads by ``deadline``; log any still running."""
        me = threading.current_thread()
        threads = self.stop(deadline)
        for thread in threads:
            if thread is not me:
                thread.join(max(0.0, deadline - _monotonic()))
        alive = [t.name for t in threads if t is not me and t.is_alive()]
        if alive:
            logger.error("tcp server: thread(s) %s still running after close(); a handler "
                         "blocks", ", ".join(alive))


class _InlineDispatch(_DispatchMode):
    """dispatch="inline": callbacks run on the I/O thread, as each batch is read."""

    runs_on_loop = True

    def submit(self, conn: _Connection, batch: List[_Call], may_run_here: bool = False) -> bool:
        run = self.call
        for call in batch:
            run(*call)
        server = self._server
        if server._dirty:  # the replies go out now, not after the loop's other work
            server._writer.flush_dirty()
        return False


class _ThreadDispatch(_DispatchMode):
    """dispatch="thread": callbacks run on a :class:`_Dispatcher` thread, in order."""

    def __init__(self, server: TCPServerTransport) -> None:
        super().__init__(server)
        self.threads = _Dispatcher(
            "eventforge-tcp-server-dispatch", server._local, server._dispatch_low,
            run=self.call,
        )

    @property
    def backlog(self) -> int:  # type: ignore[override]
        return self.threads.backlog

    def submit(self, conn: _Connection, batch: List[_Call], may_run_here: bool = False) -> bool:
        threads = self.threads
        threads.put_many(batch)
        server = self._server
        if threads.high and not server._paused:
            server._set_paused(True)
        return False

    def drain(self, deadline: float) -> bool:
        return self.threads.drain(max(0.0, deadline - _monotonic()))

    def stop(self, deadline: float) -> List[threading.Thread]:
        self.threads.stop(max(0.0, deadline - _monotonic()))
        return super().stop(deadline)


class _LeaderFollower(_DispatchMode):
    """dispatch="leader": handler calls run on the thread that read their frames.

    The leader (the thread running the I/O loop) runs the calls it read, after each loop
    iteration, one connection at a time: no thread hand-off on the common path.  When a call
    has run _TAKEOVER_AFTER (it blocks or computes), the standby becomes the leader; the
    former one finishes that connection's calls, then stands by or ends.  One thread runs a
    connection at a time, so its calls keep their order and a handler may block (even on a
    request over this server) without stalling any socket.  At most ``max_threads`` threads;
    with no standby to be had the leader leaves calls to the handler threads.

    Locks: ``lock`` guards every field here and the connections' ``pending``/``running``/
    ``queued``; no other lock is taken under it.
    """

    def __init__(self, server: TCPServerTransport) -> None:
        super().__init__(server)
        self.max_threads = server.max_handler_threads
        self.lock = threading.Lock()
        self.ready: Deque[_Connection] = collections.deque()
        self.backlog = 0  # handler calls read but not started
        self.high = False
        self._busy_since = 0.0  # when the leader started its current handler call
        self._handled = 0  # handler calls started (the standby watches it change)
        self._in_handlers: Dict[int, _Connection] = {}  # thread ident -> connection it runs
        self._standby: Optional[threading.Thread] = None
        self._standby_asleep = False
        self._standby_signal = threading.Lock()
        self._standby_signal.acquire()
        self._threads: List[threading.Thread] = []
        self._count = 0  # live threads (leader, standby, handler threads)
        self._names = itertools.count(2)
        self._stop = False

    def serve(self) -> None:
        with self.lock:
            self._count += 1
            self._threads.append(threading.current_thread())
        self._main("lead")

    def _main(self, role: str) -> None:
        server = self._server
        me = threading.current_thread()
        try:
            while True:
                if role == "lead":
                    if not server._lead():
                        return
                    role = "work"
                if role == "work":
                    self._work()
                    with self.lock:
                        if self._stop or server._loop_done.is_set() or self._standby is not None:
                            return
                        self._standby = me
                if not self._stand_by():
                    return
                role = "lead"
        finally:
            with self.lock:
                self._count -= 1
                if self._standby is me:
                    self._standby = None

    def _spawn_standby(self) -> bool:
        """Start a standby thread if none exists and the bound allows; True if one exists."""
        with self.lock:
            if self._standby is not None:
                return True
            if self._count >= self.max_threads or self._stop:
                return False
            self._count += 1
            thread = threading.Thread(
                target=self._main, args=("standby",), daemon=True,
                name=f"eventforge-tcp-server-io-{self._server.port}-{next(self._names)}",
            )
            self._standby = thread
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        thread.start()
        return True

    def _stand_by(self) -> bool:
        """Wait to take the loop over from a leader stuck in a handler; False to end."""
        server = self._server
        loop = server._loop
        assert loop is not None
        me = threading.get_ident()
        last = -1
        active = _perf_counter()
        while True:
            deep = False
            with self.lock:
                if self._stop or server._loop_done.is_set():
                    return False
                since = self._busy_since
                now = _perf_counter()
                if since and now - since >= _TAKEOVER_AFTER:
                    self._standby = None
                    self._busy_since = 0.0
                    loop.ident = me
                    break
                if self._handled != last:
                    last = self._handled
                    active = now
                elif not since and now - active > _STANDBY_IDLE:
                    self._standby_asleep = deep = True
            if deep:
                self._standby_signal.acquire()
                active = _perf_counter()
                continue
            time.sleep(_TAKEOVER_AFTER - (now - since) if since else _TAKEOVER_AFTER)
        self._spawn_standby()
        return True

    def submit(self, conn: _Connection, batch: List[_Call], may_run_here: bool = False) -> bool:
        if may_run_here and not (conn.running or conn.pending or self._standby is None):
            return True  # nothing of this connection waits: the caller runs it
        # Calls for ``conn`` wait in its queue, ``conn`` in the ready queue.
        with self.lock:
            pending = conn.pending
            if pending is None:
                pending = conn.pending = collections.deque()
            pending.extend(batch)
            self.backlog += len(batch)
            if not conn.running and not conn.queued:
                conn.queued = True
                self.ready.append(conn)
            high = self.backlog > _DISPATCH_HIGH_WATER and not self.high
            if high:
                self.high = True
        server = self._server
        if high and not server._paused:
            server._set_paused(True)
        return False

    def run_here(self, conn: _Connection, batch: List[_Call]) -> None:
        # The server's _lead checks afterwards whether this thread still leads.
        me = threading.get_ident()
        with self.lock:
            conn.running = True
            self._in_handlers[me] = conn
            if conn.pending is None:
                conn.pending = collections.deque()
            conn.pending.extend(batch)
            self.backlog += len(batch)
            call = self._next_call(conn, me)
        self._run_connection(conn, call)
        server = self._server
        if server._dirty and server._loop.ident == me:  # type: ignore[union-attr]
            server._writer.flush_dirty()  # the replies go out now

    def run_ready(self) -> bool:
        server = self._server
        loop = server._loop
        assert loop is not None
        me = threading.get_ident()
        ready = self.ready
        while True:
            with self.lock:
                if not ready:
                    return True
                if self._standby is None:
                    conn = None
                else:
                    conn = ready.popleft()
                    conn.queued = False
                    if conn.running:
                        continue
                    conn.running = True
                    self._in_handlers[me] = conn
                    call = self._next_call(conn, me)
            if conn is None:
                if not self._spawn_standby():
                    return True  # nobody could take over: leave the calls to handler threads
                continue
            self._run_connection(conn, call)
            if loop.ident != me:
                return False
            if server._dirty:
                server._writer.flush_dirty()

    def _work(self) -> None:
        """A thread that is not the leader: run ready connections until none is left."""
        me = threading.get_ident()
        while True:
            with self.lock:
                if not self.ready or self._stop:
                    return
                conn = self.ready.popleft()
                conn.queued = False
                if conn.running:
                    continue
                conn.running = True
                self._in_handlers[me] = conn
                call = self._next_call(conn, me)
            self._run_connection(conn, call)

    def _next_call(self, conn: _Connection, me: int) -> Optional[_Call]:
        """Take ``conn``'s next handler call, or release ``conn`` if none is left (``lock`` held).

        Keeps the leader's busy mark, which the standby watches, for the call taken.
        """
        leader = self._server._loop.ident == me  # type: ignore[union-attr]
        pending = conn.pending
        if not pending:
            conn.running = False
            del self._in_handlers[me]
            if leader:
                self._busy_since = 0.0
            if self.high and self.backlog < _DISPATCH_LOW_WATER:
                self.high = False
                self._server._dispatch_low()
            return None
        self.backlog -= 1
        self._handled += 1
        if leader:
            self._busy_since = _perf_counter()
            if self._standby_asleep:
                self._standby_asleep = False
                self._standby_signal.release()
        return pending.popleft()

    def _run_connection(self, conn: _Connection, call: Optional[_Call]) -> None:
        """Run ``call`` (taken with ``conn``), then ``conn``'s other pending calls in order."""
        me = threading.get_ident()
        lock = self.lock
        run = self.call
        while call is not None:
            run(*call)
            with lock:
                call = self._next_call(conn, me)

    def drain(self, deadline: float) -> bool:
        """Wait until every handler call read so far has run (not counting our own)."""
        me = threading.get_ident()
        while True:
            with self.lock:
                others = sum(1 for ident in self._in_handlers if ident != me)
                if not others and not self.ready:
                    return True
            if _monotonic() >= deadline:
                return False
            time.sleep(0.002)  # only used while closing: polling is fine

    def stop(self, deadline: float) -> List[threading.Thread]:
        self._server._loop_done.wait(max(0.0, deadline - _monotonic()))
        with self.lock:
            self._stop = True
            threads = list(self._threads)
            if self._standby_asleep:
                self._standby_asleep = False
                self._standby_signal.release()
        return threads


_DISPATCH_MODES: Dict[str, Callable[[TCPServerTransport], _DispatchMode]] = {
    "leader": _LeaderFollower, "thread": _ThreadDispatch, "inline": _InlineDispatch,
}


class TCPServerTransport(_TCPEndpoint):
    """A TCP listener that is also a full Transport for its own process.

    Messages published here (``send``) reach the local subscribers (synchronously, like
    :class:`MemoryTransport`) and every client whose interest matches; messages from a client
    reach the local subscribers, inboxes and receivers, and the other clients whose interest
    matches.  A client that never sent ``$hello`` (eventforge 0.1) gets every routed message;
    ``allow_frame_only=False`` (and always a ``secret``) refuses it.  Inbox messages
    (``_reply.``/``_rpc_reply.``) go only to the connection whose request opened the inbox.

    Call :meth:`start` before use (``port=0`` picks a free port: read :attr:`address`) and
    :meth:`close` to stop every thread and socket.  Limits: ``max_frame_size`` per frame,
    ``max_connections`` clients, ``max_outbound_bytes`` queued per client (one that does not
    read is dropped as a slow consumer), ``handshake_timeout`` for TLS and the secret handshake,
    ``frame_timeout`` for an incomplete frame.  ``secret`` requires the mutual HMAC-SHA256
    handshake; ``ssl_context`` (server-side :class:`ssl.SSLContext`) wraps every connection in
    TLS.  Every refused input is logged with its reason and counted in :attr:`stats`.

    ``dispatch="leader"`` (the default) runs the callbacks of network messages on the thread
    that read them; one running for 2 ms makes a standby thread take the I/O loop over, so a
    handler may block, even on a request over this server.  A connection's callbacks run one at
    a time in arrival order; different connections' concurrently once one blocks (at most
    ``max_handler_threads`` threads).  ``dispatch="thread"``: every callback on one dispatcher
    thread (a thread hop each).  ``dispatch="inline"``: on the I/O thread, no standby; only for
    handlers that return quickly and never wait for network traffic (meanwhile no socket is
    served).  In every mode a handler that raises anything, ``BaseException`` included, fails
    that call only.  A client's frame is acknowledged once handled (routed on, its local
    callbacks run), so :meth:`close` loses nothing a reconnecting client does not send again.

    Collaborators: :class:`_Listener` accepts, :class:`_ServerProtocol` speaks the handshake and
    control frames, :class:`_Routes` says where a message goes, :class:`_ServerWriter` gets
    frames written, a :class:`_DispatchMode` runs the handlers.  Locks, outermost first:
    ``_lock`` (start and close only), a dispatch mode's lock, ``_ServerWriter._fanout_lock``, a
    connection's ``lock``; the routing table is copy-on-write and needs none.
    """

    _log_name = "tcp server"

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = DEFAULT_TCP_PORT,
        *,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        max_connections: int = 1024,
        secret: Any = None,
        ssl_context: Optional[ssl.SSLContext] = None,
        ping_interval: Optional[float] = 15.0,
        max_outbound_bytes: int = 16 * 1024 * 1024,
        handshake_timeout: float = 5.0,
        frame_timeout: Optional[float] = 60.0,
        max_queue_size: int = 1000,
        max_interest: int = 10000,
        backlog: int = 512,
        dispatch: str = "leader",
        max_handler_threads: int = 32,
        allow_frame_only: bool = True,
    ) -> None:
        if not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"port must be an int in 0..65535, not {port!r}")
        if dispatch not in tuple(_DISPATCH_MODES):
            raise ValueError(f"dispatch must be 'leader', 'thread' or 'inline', not {dispatch!r}")
        if not isinstance(max_handler_threads, int) or max_handler_threads < 2:
            raise ValueError(
                f"max_handler_threads must be an int >= 2, not {max_handler_threads!r}")
        self.dispatch = dispatch
        self.max_handler_threads = max_handler_threads
        self._loop_done = threading.Event()
        for name, value in (("max_frame_size", max_frame_size), ("max_connections",
                             max_connections), ("max_outbound_bytes", max_outbound_bytes)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, not {value!r}")
        self.host = host
        self._port = port
        self.max_frame_size = max_frame_size
        self.max_connections = max_connections
        self.max_outbound_bytes = max_outbound_bytes
        self.handshake_timeout = handshake_timeout
        self.frame_timeout = frame_timeout
        self.ping_interval = ping_interval
        self.max_interest = max_interest
        self.backlog = backlog
        self._key = _secret_key(secret)
        # Peers that never send $hello; a secret always refuses them.
        self.allow_frame_only = bool(allow_frame_only) and self._key is None
        self.ssl_context = ssl_context
        self._local = MemoryTransport(max_queue_size)
        self._lock = threading.Lock()
        self._listener: Optional[_Listener] = None  # once started
        self._loop: Optional[_Loop] = None
        self._reading = True  # False once close() stopped reading
        self._conns: Dict[int, _Connection] = {}
        self._routes = _Routes()  # copy on write: read by any thread without a lock
        self._writer = _ServerWriter(self)
        self._dirty = self._writer.dirty
        self._push = self._writer.push  # bound once: the hottest call of the server
        self._paused = False
        self._started = False
        self._closed = False
        self._reads_stopped = threading.Event()
        self._counts: Dict[str, _Counter] = {name: _Counter() for name in _SERVER_COUNTERS}
        # Bumped by the loop thread only (one writer, no lost update), read by
        # any: plain ints on the hottest path.
        self._messages_in = 0
        self._bytes_in = 0
        self._closed_conns: Deque[Dict[str, Any]] = collections.deque(maxlen=_CLOSED_KEPT)
        self._gone_bytes_out = 0  # bytes sent by connections that closed since
        self._mode = _DISPATCH_MODES[dispatch](self)  # runs the handler calls
        self._protocol = _ServerProtocol(self)  # handshakes, control frames, $ack

    # -- lifecycle ----------------------------------------------------------------

    @property
    def address(self) -> Optional[Tuple[str, int]]:
        """The bound ``(host, port)`` after :meth:`start`, else None."""
        return None if self._listener is None else self._listener.address

    @property
    def port(self) -> int:
        """The bound port after :meth:`start` (the configured one before)."""
        return self._listener.address[1] if self._listener is not None else self._port

    def start(self) -> TCPServerTransport:
        """Bind and listen, then serve on a background thread; returns self."""
        with self._lock:
            if self._closed:
                raise TransportClosedError("TCPServerTransport is closed")
            if self._started:
                return self
            listener = _Listener(self)
            loop = _Loop("eventforge-tcp-server-io")
            try:
                listener.bind(loop.selector)
            except BaseException:
                loop.close()
                raise
            loop.name = f"eventforge-tcp-server-io-{listener.address[1]}"
            self._listener, self._loop = listener, loop
            self._started = True
            loop.start(self._run)
        logger.info("tcp server listening on %s", _peer_name(listener.address))
        return self

    def close(self, timeout: float = 5.0) -> None:
        """Stop accepting and reading, handle what was read, close every connection.

        Handler calls of frames already read run until ``timeout`` (seconds) has nearly passed
        (a quarter of it, at most 1 s, is kept for the rest); calls not started by then are
        skipped, their frames never acknowledged, so a reconnecting client sends them again
        (at-least-once).  Then what was handled is acknowledged, replies flushed, connections
        closed and threads joined, within about ``timeout``; only a handler still running (it
        blocks) can outlive it, and that is logged.  Safe to call twice and from a handler.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            loop = self._loop
        if loop is None:
            self._mode.stop(_monotonic())
            self._local.close()
            return
        deadline = _monotonic() + timeout
        handle_until = deadline - min(1.0, timeout / 4)
        if self._mode.runs_on_loop and loop.in_loop():
            # close() from a handler on the I/O thread: the rest of the batch it
            # runs in cannot be waited for, so it is left unacknowledged.
            self._stop_reading()
            self._skip_unstarted()
            self._shutdown(deadline)
            self._local.close()
            return  # the loop ends (and cleans up) when this handler returns
        loop.call_soon(self._stop_reading)
        if not self._drain(handle_until):
            self._skip_unstarted()
            self._drain(deadline)  # only calls still running remain: wait for them
        loop.call_soon(lambda: self._shutdown(deadline))
        self._mode.join(deadline)
        self._local.close()

    def _skip_unstarted(self) -> None:
        self._mode.discard = True
        left = self._mode.backlog
        self._count("unhandled_at_close", left)
        logger.warning("tcp server: closing; %d handler call(s) not started are skipped and "
                       "their frames left unacknowledged (clients send them again)", left)

    def _count(self, name: str, amount: int = 1) -> None:
        counter = self._counts.get(name)
        if counter is None:  # a reason counted for the first time ("closed_by_server" ...)
            counter = self._counts.setdefault(name, _Counter())
        counter.add(amount)

    # -- Transport API ------------------------------------------------------------

    def send(self, message: Message) -> None:
        """Route ``message`` to matching clients and deliver it locally."""
        topic = message.topic
        if type(topic) is not str or topic not in self._routes.exact:  # keys there are valid
            validate_topic(topic)
        if self._local.closed:
            raise TransportClosedError("TCPServerTransport is closed")
        targets, taken = self._routes.targets(topic, None)
        if targets:
            frame = encode(message, max_frame_size=self.max_frame_size)
            self._counts["messages_out"].add(len(targets))
            if len(targets) == 1:
                self._push(targets[0], frame)
            else:
                self._writer.push_many(targets, frame)
        try:
            subscriptions = self._local._deliver(message, taken)
        except TransportClosedError:
            # Closed while this send was under way (by a handler its routing
            # woke, say): the send was accepted above; nothing local is left.
            return
        if subscriptions:
            self._local._run_subscriptions(subscriptions, message)

    @property
    def stats(self) -> Dict[str, int]:
        """Local delivery counters plus connection, frame and refusal counters."""
        stats = dict(self._local.stats)
        stats.update((name, counter.value) for name, counter in list(self._counts.items()))
        stats["messages_in"], stats["bytes_in"] = self._messages_in, self._bytes_in
        conns = list(self._conns.values())
        stats["connections"] = len(conns)
        stats["handshake_peers"] = sum(1 for c in conns if c.handshake)
        stats["frame_peers"] = len(self._routes.broadcast)
        stats["outbound_bytes"] = sum(c.out_bytes for c in conns)
        stats["bytes_out"] = self._gone_bytes_out + sum(c.bytes_out for c in conns)
        stats["inbound_buffered"] = sum(c.decoder.buffered for c in conns)
        stats["dispatch_backlog"] = self._mode.backlog
        return stats

    def connections(self, closed: bool = False) -> List[Dict[str, Any]]:
        """Snapshots of the open connections, or of the last 256 closed ones (oldest first).

        Dicts (see :meth:`_Connection.snapshot`); a closed one also has ``stop`` (epoch
        seconds), ``reason`` and ``counter`` (its :attr:`stats` key).
        """
        if closed:
            return [dict(info) for info in list(self._closed_conns)]
        return [conn.snapshot() for conn in list(self._conns.values())]

    def interest_counts(self) -> Dict[str, int]:
        """How many connections hold each interest pattern (or exact topic)."""
        counts: collections.Counter[str] = collections.Counter()
        for conn in list(self._conns.values()):
            counts.update(list(conn.interest))
        return dict(counts)

    def debug_state(self) -> Dict[str, Any]:
        """Internal state, for tests and diagnostics only (not a stable API).

        ``exact``: topic -> connections routed to (inboxes included); ``patterns``: wildcard
        routes; ``frame_peers``: peers that get every routed message; ``connections``: id ->
        ``peer``, ``features``, ``peer_max_frame``, ``interest``.
        """
        state = self._routes.debug_state()
        state["connections"] = {
            conn.id: {"peer": conn.peer, "features": conn.features,
                      "peer_max_frame": conn.peer_max_frame, "interest": list(conn.interest)}
            for conn in list(self._conns.values())
        }
        return state

    def debug_cut_connections(self, reason: str = "cut for a test") -> None:
        """Close every connection abruptly, as a network failure would (tests; ``disconnects``)."""
        for conn in list(self._conns.values()):
            self._close_later(conn, "disconnects", reason)

    def __repr__(self) -> str:
        if self._listener is not None:
            where = _peer_name(self._listener.address)
        else:
            where = f"{self.host}:{self._port}"
        state = "closed" if self._closed else f"{len(self._conns)} connections"
        return f"<TCPServerTransport {where} {state}>"

    # -- hooks of _TCPEndpoint -----------------------------------------------------

    def _live(self, conn: _Connection) -> bool:
        return not conn.closed

    def _write_on_loop(self, conn: _Connection) -> None:
        self._dirty[conn.id] = conn  # written after this loop iteration, with the rest

    def _write_failed(self, conn: _Connection, exc: OSError) -> None:
        loop = self._loop
        if loop is not None:  # never inside the write: it may run in the middle of a flush
            loop.call_soon(lambda: self._read_then_drop(conn, f"write failed: {exc}"))

    def _read_then_drop(self, conn: _Connection, what: str) -> None:
        if self._may_read(conn):
            self._read_what_is_left(conn, functools.partial(self._on_readable, conn))
        if not conn.closed:
            counter = "truncated_frames" if conn.decoder.buffered else "resets"
            self._drop(conn, counter, self._eof_reason(conn, what))

    def _may_read(self, conn: _Connection) -> bool:
        return not conn.closed and self._reading

    def _internal_error(self, conn: _Connection) -> None:
        self._drop(conn, "internal_errors", "internal error (see traceback)")

    def _read_failed(self, conn: _Connection, exc: OSError) -> None:
        reset = isinstance(exc, ConnectionResetError)
        what = "connection reset by peer" if reset else f"read failed: {exc}"
        self._drop(conn, "resets", self._eof_reason(conn, what))

    def _peer_closed(self, conn: _Connection) -> None:
        if conn.decoder.buffered:
            self._drop(conn, "truncated_frames", self._eof_reason(conn, "peer closed"))
        else:
            self._drop(conn, "disconnects", "peer closed the connection", logging.DEBUG)

    def _bytes_read(self, size: int) -> None:
        self._bytes_in += size

    def _oversize(self, conn: _Connection, exc: FrameTooLargeError, data: bytes) -> None:
        for body in getattr(exc, "frames", ()):
            self._on_frame(conn, body)
        self._drop(conn, "oversize_frames",
                   f"{exc}; closed before buffering the body{_describe_garbage(data[:4])}")

    def _dead(self, conn: _Connection, reason: str) -> None:
        self._drop(conn, "dead_peers", reason)

    def _on_control(self, conn: _Connection, topic: str, payload: Any) -> None:
        self._protocol.on_control(conn, topic, payload)

    def _send_ping(self, conn: _Connection) -> None:
        self._push(conn, _control_frame("$ping", {}))

    def _close_later(self, conn: _Connection, counter: str, reason: str) -> None:
        """Close ``conn`` from any thread: at once on the loop thread, else soon there."""
        loop = self._loop
        if loop is not None and loop.in_loop():
            self._drop(conn, counter, reason)
        else:
            with conn.lock:
                if conn.closed:
                    return
                conn.closed = True  # refuse more frames right away
            if loop is not None:
                loop.call_soon(lambda: self._drop(conn, counter, reason, force=True))

    # -- loop thread ----------------------------------------------------------------

    def _run(self) -> None:
        loop = self._loop
        assert loop is not None
        loop.ident = threading.get_ident()
        self._mode.serve()

    def _lead(self) -> bool:
        """Run the I/O loop on this thread; True if another thread took it over."""
        loop = self._loop
        assert loop is not None
        me = threading.get_ident()
        listener = self._listener
        protocol = self._protocol
        tick_every = 0.25
        next_tick = time.monotonic() + tick_every
        try:
            while True:
                timeout = max(0.0, next_tick - time.monotonic())
                if protocol.ack_due:
                    timeout = min(timeout, max(0.0, protocol.ack_at - time.monotonic()))
                if self._dirty or self._mode.ready:
                    timeout = 0.0
                for key, mask in loop.selector.select(timeout):
                    obj = key.data
                    if obj is None:
                        loop.run_calls(drain=True)
                    elif obj is listener:
                        self._guarded(listener.accept)
                    else:
                        self._serve_event(obj, mask)
                        if loop.ident != me:
                            return True  # demoted in a handler: the loop goes on elsewhere
                if self._mode.ready and not self._mode.run_ready():
                    return True  # demoted while running a handler: the loop goes on elsewhere
                loop.run_calls()
                if protocol.ack_due and time.monotonic() >= protocol.ack_at:
                    self._guarded(protocol.send_acks)
                if self._dirty:
                    self._guarded(self._writer.flush_dirty)
                now = time.monotonic()
                if now >= next_tick:
                    next_tick = now + tick_every
                    self._guarded(self._tick, now)
                if self._closing_done:
                    break
        except Exception:  # pragma: no cover - a bug; never leave a silent dead server
            logger.exception("tcp server: I/O loop crashed; closing every connection")
        self._teardown()
        self._loop_done.set()
        return False

    _closing_done = False

    # -- reading and routing --------------------------------------------------------

    def _drain(self, deadline: float) -> bool:
        """Wait until reads stopped and every handler call read so far has run."""
        if not self._reads_stopped.wait(max(0.0, deadline - _monotonic())):
            return False
        return self._mode.drain(deadline)

    def _guarded(self, func: Callable[..., Any], *args: Any) -> None:
        """Run a housekeeping step; a bug in it is logged, never kills the loop."""
        try:
            func(*args)
        except Exception:
            self._count("internal_errors")
            logger.exception("tcp server: internal error in %s", func.__name__)

    def _update_events(self, conn: _Connection) -> None:
        if conn.closed:
            return
        conn.set_events(self._loop.selector, self._paused)  # type: ignore[union-attr]

    def _on_writable(self, conn: _Connection) -> None:
        if conn.state == _TLS:
            self._protocol.tls_handshake(conn)
        else:
            super()._on_writable(conn)

    def _on_readable(self, conn: _Connection) -> None:
        if conn.state == _TLS:
            self._protocol.tls_handshake(conn)
            return
        bodies = self._read_frames(conn)
        if bodies is None:
            return
        batch: List[_Call] = []
        for body in bodies:
            if conn.closed:
                break
            self._on_frame(conn, body, batch)
        # The leader may run the batch here, after the acknowledgement below.
        run_here = bool(batch) and self._mode.submit(conn, batch, may_run_here=True)
        if conn.received != conn.acked and conn.handshake and "ack" in conn.features:
            # Acknowledged once handled: now if enough are, else within _ACK_DELAY.
            protocol = self._protocol
            if conn.received - conn.acked < _ACK_EVERY or not protocol.report_progress(conn):
                protocol.progress_due(conn)
        if run_here:
            self._mode.run_here(conn, batch)

    @staticmethod
    def _eof_reason(conn: _Connection, what: str) -> str:
        buffered = conn.decoder.buffered
        if buffered:
            return f"{what} in the middle of a frame ({buffered} bytes of it received)"
        return what

    def _bad_frame(self, conn: _Connection, exc: FrameError) -> None:
        if conn.state != _READY and self._key is not None:
            self._drop(conn, "auth_failures",
                       f"authentication required; first frame was invalid: {exc}")
            return
        conn.received += 1
        self._count("frame_errors")
        logger.warning("tcp server: rejected a frame from %s: %s", conn.peer, exc)

    def _on_message(
        self, conn: _Connection, message: Message, body: bytes, batch: Optional[List[_Call]]
    ) -> None:
        if conn.state != _READY:
            if conn.state == _NEW and self.allow_frame_only:
                conn.state = _READY  # a frame-only peer (an eventforge 0.1 client)
            elif conn.state == _NEW and self._key is None:
                self._protocol.refuse(conn, "frame_only_refused", "protocol",
                             "frame-only peers are refused here: send $hello first "
                             "(allow_frame_only=False)")
                return
            else:
                self._drop(conn, "auth_failures",
                           "authentication required: a message arrived before the handshake")
                return
        conn.received += 1
        self._messages_in += 1
        self._route_incoming(conn, message, body, batch)

    def _route_incoming(
        self, origin: _Connection, message: Message, body: bytes, batch: Optional[List[_Call]]
    ) -> None:
        topic = message.topic
        reply_to = message.reply_to
        if (reply_to is not None and origin.implicit and reply_to not in origin.interest
                and reply_to.startswith(INBOX_PREFIXES)):
            self._protocol.implicit_interest(origin, reply_to)
        targets, taken = self._routes.targets(topic, origin)
        if targets:
            frame = len(body).to_bytes(4, "big") + body
            self._counts["messages_out"].add(len(targets))
            for conn in targets:
                self._push(conn, frame)
        try:
            subscriptions = self._local._deliver(message, taken)
        except TransportClosedError:
            return
        if subscriptions:
            headers = message.headers
            expires = _ttl_expiry(headers[_TTL_HEADER]) if _TTL_HEADER in headers else 0.0
            if origin.waiting is not None:  # it counts as handled once the call finished
                origin.waiting.append(origin.received)
            call = (subscriptions, message, expires, origin)
            if batch is not None:
                batch.append(call)
            else:
                self._mode.submit(origin, [call])

    # -- housekeeping -------------------------------------------------------------------

    def _tick(self, now: float) -> None:
        listener = self._listener
        if listener is not None and listener.paused and not self._reads_stopped.is_set():
            listener.resume(self._loop.selector)  # type: ignore[union-attr]
        for conn in list(self._conns.values()):
            if not conn.closed and self._protocol.in_time(conn, now):
                self._check_alive(conn, now)

    def _set_paused(self, paused: bool) -> None:
        self._paused = paused
        if paused:
            logger.info("tcp server: %d messages wait for handlers; pausing reads",
                        self._mode.backlog)
        for conn in list(self._conns.values()):
            self._update_events(conn)

    def _resume_reading(self) -> None:
        if self._paused and not self._closed:
            self._set_paused(False)

    def _drop(self, conn: _Connection, counter: str, reason: str,
              level: int = logging.WARNING, force: bool = False) -> None:
        """Close ``conn`` (loop thread only), log ``reason`` and count it."""
        with conn.lock:
            if conn.closed and not force:
                return
            conn.closed = True
        if conn.id not in self._conns:
            return
        self._count(counter)
        info = conn.snapshot()
        info.update(stop=time.time(), reason=reason, counter=counter)
        self._closed_conns.append(info)
        self._gone_bytes_out += info["out_bytes"]
        # Routes next: once the connection no longer counts, nothing may
        # still be routed to it (a late reply is then dropped and counted).
        self._routes.forget(conn)
        del self._conns[conn.id]
        logger.log(level, "tcp server: closed %s: %s", conn.peer, reason)
        self._close_socket(conn)
        self._dirty.pop(conn.id, None)
        self._protocol.ack_due.pop(conn.id, None)
        with conn.lock:
            conn.out.clear()
            conn.out_bytes = 0
            conn.cur = None

    def _stop_reading(self) -> None:
        loop = self._loop
        assert loop is not None
        if self._listener is not None:
            self._listener.close(loop.selector)
        self._paused = True
        self._reading = False
        for conn in list(self._conns.values()):
            self._update_events(conn)
        self._reads_stopped.set()

    def _shutdown(self, deadline: float) -> None:
        # Acknowledge what was handled, flush replies (until ``deadline``), then close.
        conns = list(self._conns.values())
        for conn in conns:
            if conn.waiting is not None and not conn.closed:
                self._protocol.report_progress(conn)
        self._writer.write_out(conns, deadline)
        self._closing_done = True

    def _teardown(self) -> None:
        for conn in list(self._conns.values()):
            self._drop(conn, "closed_by_server", "server closing", logging.DEBUG)
        if self._listener is not None:
            self._listener.close()
        self._reads_stopped.set()
        loop = self._loop
        if loop is not None:
            loop.close()


# Clients still open at interpreter exit deliver what they accepted (weakly
# held: an unreferenced, closed client is not kept alive by this).
_open_clients: Any = weakref.WeakSet()
_exit_hook_installed = False


def _close_open_clients() -> None:
    """atexit: close every client still open in this process, sharing one deadline."""
    deadline = time.monotonic() + _CLOSE_TIMEOUT
    pid = os.getpid()
    for client in list(_open_clients):
        if client._pid != pid:  # inherited through fork: its threads are not here
            continue
        try:
            client.close(max(0.0, deadline - time.monotonic()))
        except Exception:  # pragma: no cover - keep closing the others
            logger.exception("tcp client: close at exit failed")


def _watch_at_exit(client: Any) -> None:
    global _exit_hook_installed
    if not _exit_hook_installed:
        import atexit

        atexit.register(_close_open_clients)
        _exit_hook_installed = True
    _open_clients.add(client)


def _describe_frame(frame: bytes) -> str:
    """``message <id> on '<topic>' (<n> bytes)`` for a log line about a frame."""
    try:
        message = decode(frame[4:])
    except FrameError:
        return f"a frame of {len(frame) - 4} bytes"
    return f"message {message.id} on {message.topic!r} ({len(frame) - 4} bytes)"


def _with_ttl(frame: bytes, remaining: float) -> bytes:
    """``frame`` re-encoded with its ``_ttl_ms`` header set to ``remaining`` seconds."""
    message = decode(frame[4:])
    message.headers["_ttl_ms"] = max(1, int(remaining * 1000))
    return encode(message, max_frame_size=len(frame) + 64)


class _Backlog:
    """A client's unacknowledged message frames, the room left for more, its requests.

    An item is ``[seq, frame, charges, deadline]``: the frame's number on the current
    connection (0: not sent on it), the frame (b"" once acknowledged or withdrawn), connections
    that broke with it the oldest unacknowledged frame, a request's ``_ttl_ms`` deadline or
    None.  Kept until acknowledged (``acked``: feature "ack"), else only while there is no
    connection.  ``requests``: inbox topic -> ``[inbox, connection it went out on, item]``.
    ``changed`` is a condition on the client's lock, held around every call.
    """

    __slots__ = ("items", "bytes", "counts", "changed", "waiters", "max_items", "max_bytes",
                 "acked", "seq", "requests")

    def __init__(self, lock: threading.Lock, counts: Dict[str, int], max_items: int,
                 max_bytes: int) -> None:
        self.items: Deque[List[Any]] = collections.deque()
        self.bytes = 0  # of the frames still to deliver (acknowledged or withdrawn: 0)
        self.counts = counts
        self.changed = threading.Condition(lock)
        self.waiters = 0
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.acked = False
        self.seq = 0
        self.requests: Dict[str, List[Any]] = {}

    # -- room -------------------------------------------------------------------------

    def has_room(self, size: int) -> bool:
        """True if one more frame of ``size`` bytes fits."""
        return len(self.items) < self.max_items and self.bytes + size <= self.max_bytes

    def full(self, state: str) -> TransportFullError:
        """Count a refused frame; the error to raise (``state``: why the frames wait)."""
        self.counts["full"] += 1
        return TransportFullError(f"{len(self.items)} messages ({self.bytes} bytes) {state}; "
                                  f"max_pending={self.max_items}")

    def wait(self, timeout: float) -> None:
        """Wait on :attr:`changed` for at most ``timeout`` seconds."""
        self.waiters += 1
        try:
            self.changed.wait(timeout)
        finally:
            self.waiters -= 1

    def wake(self) -> None:
        """Wake whoever waits on :attr:`changed`."""
        if self.waiters:
            self.changed.notify_all()

    # -- frames -------------------------------------------------------------------------

    def add(self, seq: int, frame: bytes, deadline: Optional[float]) -> List[Any]:
        item = [seq, frame, 0, deadline]
        self.items.append(item)
        self.bytes += len(frame)
        return item

    def buffer(self, frame: bytes, deadline: Optional[float]) -> List[Any]:
        """Keep ``frame`` for the next connection (raise TransportFullError if no room)."""
        if not self.has_room(len(frame)):
            raise self.full("wait for a connection")
        self.counts["buffered"] += 1
        return self.add(0, frame, deadline)

    def acknowledge(self, n: int) -> None:
        """The server handled the connection's frames up to number ``n``."""
        items = self.items
        while items and 0 < items[0][0] <= n:
            item = items.popleft()
            self.bytes -= len(item[1])
            item[1] = b""
        self.wake()

    def withdraw(self, item: List[Any]) -> None:
        """Never send ``item`` again; it keeps its place (the server may still ack it)."""
        self.bytes -= len(item[1])
        item[1] = b""
        if not item[0]:
            self.counts["withdrawn"] += 1

    def connection_lost(self, conn: _Connection) -> List[_ClientInbox]:
        """Charge the oldest frame sent on ``conn``; return the inboxes of requests sent on it.

        Acknowledgements are cumulative: a server that keeps closing over one frame stops there.
        """
        failed: List[_ClientInbox] = []
        for record in self.requests.values():
            if record[1] is conn:
                record[1] = None
                item = record[2]
                if item is not None and item[1]:
                    self.withdraw(item)
                failed.append(record[0])
        self.counts["failed_requests"] += len(failed)
        for item in self.items:
            if item[1]:
                if item[0]:
                    item[2] += 1
                break
        for item in self.items:
            item[0] = 0
        self.wake()
        return failed

    def resend(self, conn: _Connection, limit: int) -> List[bytes]:
        """Number the frames for the new connection ``conn`` (1, 2 ...) and return them.

        Dropped, logged and counted: over the server's ``limit`` (``too_large``), oldest
        unacknowledged on ``_MAX_SEND_ATTEMPTS`` broken connections (``refused``), a request
        past its TTL (``expired``); a request with time left goes with its ``_ttl_ms`` cut.
        """
        frames: List[bytes] = []
        kept: Deque[List[Any]] = collections.deque()
        now = time.monotonic()
        expired = 0
        for item in self.items:
            frame = item[1]
            if not frame:  # acknowledged or withdrawn
                continue
            if item[2] >= _MAX_SEND_ATTEMPTS:
                self._drop(item, "refused", conn.peer, f"the connection broke {item[2]} times "
                           "with it unacknowledged (the server refuses it?)")
                continue
            if len(frame) - 4 > limit:
                self._drop(item, "too_large", conn.peer,
                           f"the server now takes at most {limit} bytes per frame")
                continue
            if item[3] is not None:
                remaining = item[3] - now
                if remaining <= 0:
                    item[1] = b""
                    expired += 1
                    continue
                frame = item[1] = _with_ttl(frame, remaining)
            item[0] = len(frames) + 1
            kept.append(item)
            frames.append(frame)
        self.items = kept
        self.bytes = sum(len(item[1]) for item in kept)
        self.seq = len(frames)
        if expired:
            self.counts["expired"] += expired
            logger.info("tcp client: %d request(s) expired while disconnected; not resent", expired)
        if frames:
            self.counts["resent"] += len(frames)
            for record in self.requests.values():  # requests now in flight on conn
                item = record[2]
                if item is not None and item[1] and item[0]:
                    record[1] = conn
        return frames

    def _drop(self, item: List[Any], counter: str, where: str, reason: str) -> None:
        frame = item[1]
        item[1] = b""
        self.counts[counter] += 1
        logger.warning("tcp client: dropped %s for %s: %s", _describe_frame(frame), where, reason)

    def written(self) -> None:
        """A server without acknowledgements: what was written is all it gets."""
        for item in self.items:
            item[1] = b""
        self.items.clear()
        self.bytes = 0

    def undelivered(self) -> int:
        """Frames still to deliver (neither acknowledged nor withdrawn)."""
        return sum(1 for item in self.items if item[1])

    # -- requests --------------------------------------------------------------------------

    def track(self, topic: str, inbox: Inbox) -> None:
        """``inbox`` (on ``topic``) waits for replies to requests naming it."""
        self.requests[topic] = [inbox, None, None]

    def untrack(self, topic: str, inbox: Inbox) -> None:
        """``inbox`` closed: withdraw its request still waiting to go out or for an ack."""
        record = self.requests.get(topic)
        if record is not None and record[0] is inbox:
            del self.requests[topic]
            item = record[2]
            if item is not None and item[1]:
                self.withdraw(item)


class _Interest:
    """What a :class:`TCPClientTransport` wants from its server, and what it has not told it.

    ``counts``: pattern -> users; the server hears of the first user and, via ``removals``
    (batched), of the last one leaving.  With the features "interest" and "reply"
    (``implicit``) a new inbox waits in ``deferred``: the request naming it as ``reply_to``
    tells the server, any other frame carries it first.  The client holds its lock around
    every call.
    """

    __slots__ = ("counts", "removals", "deferred", "implicit", "receiving", "patterns")

    def __init__(self) -> None:
        self.counts: Dict[str, int] = {}
        self.removals: Dict[str, None] = {}
        self.deferred: Dict[str, None] = {}
        self.implicit = False
        self.receiving: Dict[str, None] = {}
        self.patterns: Dict[str, str] = {}

    def add(self, pattern: str, told: bool, defer: bool = False) -> bytes:
        """One more user of ``pattern``; the ``$interest`` frame to send now, or b""."""
        count = self.counts.get(pattern, 0)
        self.counts[pattern] = count + 1
        if count or not told:
            return b""
        if self.removals and pattern in self.removals:
            del self.removals[pattern]  # withdrawn but not told yet: still known
            return b""
        if defer and self.implicit:
            self.deferred[pattern] = None  # sent with the next frame, or implied by it
            return b""
        removed, self.removals = list(self.removals), {}
        return _interest_frame([pattern], removed)

    def remove(self, pattern: str, told: bool) -> None:
        """One user fewer of ``pattern``; the last one's withdrawal waits in ``removals``."""
        count = self.counts.get(pattern, 0)
        if count > 1:
            self.counts[pattern] = count - 1
            return
        self.counts.pop(pattern, None)
        if pattern in self.deferred:  # the server never heard of it
            del self.deferred[pattern]
            return
        if count and told:
            self.removals[pattern] = None

    def pending(self) -> bool:
        """True if some change waits to be told to the server."""
        return bool(self.removals or self.deferred)

    def changes(self) -> bytes:
        """The ``$interest`` frame telling the deferred inboxes and the withdrawals."""
        added = list(self.deferred)
        self.deferred.clear()
        removed, self.removals = list(self.removals), {}
        return _interest_frame(added, removed)

    def before(self, reply_to: Optional[str]) -> bytes:
        """What must precede a frame naming ``reply_to``: deferred inboxes but its own (implied)."""
        if self.deferred and reply_to is not None:
            self.deferred.pop(reply_to, None)
        if self.deferred or len(self.removals) >= _REMOVALS_BATCH:
            return self.changes()
        return b""

    def adopt(self, features: frozenset, handshake: bool) -> bytes:
        """A new connection's terms; return the ``$interest`` frame telling all the interest."""
        self.removals = {}  # the server learns the whole interest anyway
        self.deferred = {}
        self.implicit = "interest" in features and "reply" in features
        if handshake and self.counts:
            return _control_frame("$interest", {"add": list(self.counts)})
        return b""


class _Confirmations:
    """What a client's callers wait for from its server, and the waiting.

    Room in the backlog (``send``); ``flush()``: ``$flushed`` for ``$flush``, else ``$pong``
    for ``$ping`` and the acknowledgement of what was sent before; ``close()``: every accepted
    message acknowledged (or written).  Waits hold the client's ``_lock`` and wait on
    ``_backlog.changed``.
    """

    __slots__ = ("client", "ids", "flushed_upto", "pings_sent", "pongs")

    def __init__(self, client: TCPClientTransport) -> None:
        self.client = client
        self.ids = itertools.count(1)
        self.flushed_upto = 0  # highest $flushed id seen
        self.pings_sent = 0  # $ping frames sent on this connection ...
        self.pongs = 0  # ... and $pong answers to them (they come in order)

    def flush(self, deadline: float) -> bool:
        """:meth:`TCPClientTransport.flush`: wait for a connection, ask, wait for the answer."""
        while True:
            done = self._flush_on(self._connected(deadline), deadline)
            if done is not None:
                return done

    def _connected(self, deadline: float) -> _Connection:
        c = self.client
        with c._lock:
            while c._conn is None or c._closed:
                c._life.check_usable()
                self._wait(deadline, 1.0)
            return c._conn

    def _wait(self, deadline: float, poll: float) -> None:
        # With the client's lock held: one wait for a change, at most ``poll`` s.
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise EventforgeTimeoutError(
                f"{self.client._name()}: the server did not confirm the flush in time"
            )
        self.client._backlog.wait(min(remaining, poll))

    def _flush_on(self, conn: _Connection, deadline: float) -> Optional[bool]:
        """Flush over ``conn``; None if it broke meanwhile (the caller retries)."""
        c = self.client
        with c._lock:
            if c._conn is not conn:
                return None
            frame = c._interest.changes() if c._interest.pending() else b""
            ask, done = self._ask(conn.features if conn.handshake else frozenset(), c._backlog)
            frame += ask
            if frame:
                conn.enqueue(frame)
        c._kick(conn)
        with c._lock:
            while c._conn is conn:
                if done is None:
                    if conn.out_bytes == 0 and conn.cur is None:
                        return False
                    self._wait(deadline, 0.005)  # nothing signals a write: poll
                elif done():
                    return True
                else:
                    self._wait(deadline, 1.0)
        return None

    def _ask(self, features: frozenset,
             backlog: _Backlog) -> Tuple[bytes, Optional[Callable[[], bool]]]:
        """The frame asking the server to confirm all sent so far, and the test that it did.

        ``(b"", None)``: the server cannot confirm anything (no handshake).
        """
        if "flush" in features:
            ident = next(self.ids)
            return _control_frame("$flush", {"id": ident}), lambda: self.flushed_upto >= ident
        if "ping" in features:
            self.pings_sent += 1
            target, last_seq, pending = self.pings_sent, backlog.seq, backlog.items
            return _control_frame("$ping", {}), lambda: self.pongs >= target and (
                not pending or pending[0][0] > last_seq or not backlog.acked)
        return b"", None

    def confirmed(self, conn: _Connection, topic: str, payload: Dict[str, Any]) -> None:
        """A ``$pong`` or a ``$flushed`` arrived on ``conn``."""
        c = self.client
        if topic == "$pong":
            with c._lock:
                if c._conn is conn:
                    self.pongs += 1
                    c._backlog.wake()
            return
        ident = payload.get("id")
        if type(ident) is int:
            with c._lock:
                if ident > self.flushed_upto:
                    self.flushed_upto = ident
                c._backlog.wake()

    def delivered(self, deadline: float) -> None:
        """Wait (up to ``deadline``) until every accepted message reached the server."""
        c = self.client
        c._nudge.set()  # a reconnect waiting out its backoff tries again now
        backlog = c._backlog
        with c._lock:
            while True:
                conn = c._conn
                if conn is None:
                    waiting = backlog.bytes > 0 and c.reconnect and c._failed is None
                elif backlog.acked:
                    waiting = backlog.bytes > 0
                else:
                    waiting = conn.out_bytes > 0 or conn.cur is not None
                remaining = deadline - time.monotonic()
                if not waiting or remaining <= 0:
                    break
                backlog.wait(remaining if conn is None or backlog.acked
                             else min(remaining, 0.005))  # nothing signals a write: poll
            left = backlog.undelivered()
        if left:
            logger.warning(
                "tcp client: closed with %d message(s) %s", left,
                "not acknowledged by the server" if conn is not None
                else "never sent (disconnected)",
            )

    def room(self, size: int) -> Optional[_Connection]:
        """The connection once the backlog has room for ``size`` bytes (None: lost meanwhile).

        Waits up to ``send_timeout`` for acknowledgements, slowing down a fast publisher.
        """
        c = self.client
        backlog = c._backlog
        deadline = time.monotonic() + c.send_timeout
        while (c._conn is not None and backlog.acked and not c._closed
               and not backlog.has_room(size)):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            backlog.wait(remaining)
        if c._closed:
            raise TransportClosedError(f"{c._name()} is closed")
        if c._conn is not None and not backlog.has_room(size):
            raise backlog.full(f"are unacknowledged after {c.send_timeout} s")
        return c._conn


class _ClientInbox(Inbox):
    """A request inbox of a :class:`TCPClientTransport`.

    ``get`` first reads the socket itself a while, so the reply wakes the waiting thread with
    no I/O-thread hop; a subscriber callback waiting here first hands the dispatcher role on
    (the reply may pass through a subscriber).  Raises ConnectionLostError once it broke.
    """

    _transport: Any = None
    _read_ahead = False
    _failure: Optional[str] = None

    def _fail(self, reason: str) -> None:
        """The reply can no longer come: wake the getters, who raise ConnectionLostError."""
        with self._lock:
            if self._closed or self._failure is not None:
                return
            self._failure = reason
            waiters, self._waiters = self._waiters, collections.deque()
        for waiter in waiters:
            waiter.fulfil(None)

    def _register(self, timeout: Optional[float]) -> Tuple[Optional[Message], Optional[_Waiter]]:
        if self._failure is not None and not self._messages:
            return None, None  # no waiting for a reply that cannot come
        return Inbox._register(self, timeout)

    def _check(self, message: Optional[Message]) -> Optional[Message]:
        if message is None and self._failure is not None and not self._closed:
            raise ConnectionLostError(self._failure)
        return message

    def get(self, timeout: Optional[float] = None) -> Optional[Message]:
        if not self._messages and not self._closed and self._failure is None:
            if timeout is None or timeout > 0:
                transport = self._transport
                if transport._dispatcher._thread is threading.current_thread():
                    transport._dispatcher.hand_off_if_current()
                if self._read_ahead:
                    budget = _CALLER_READ if timeout is None else min(timeout, _CALLER_READ)
                    started = _perf_counter()
                    transport._read_until(self, budget)
                    if timeout is not None:
                        timeout = max(0.0, timeout - (_perf_counter() - started))
        return self._check(Inbox.get(self, timeout))

    async def get_async(self, timeout: Optional[float] = None) -> Optional[Message]:
        return self._check(await Inbox.get_async(self, timeout))


class _Opened(NamedTuple):
    """A connection a :class:`_Dialer` opened, and what its handshake agreed."""

    sock: socket.socket
    decoder: FrameDecoder
    handshake: bool  # the server answered $hello: it keeps interest, may acknowledge ...
    features: frozenset  # agreed in the handshake (empty without one)
    early: List[Message]  # messages that came before the handshake ended
    nonce: bytes  # of a $hello left unanswered (b"" if none): a late $welcome is adopted
    limit: Optional[int]  # the server's max_frame_size, if it told


def _client_handshake(client: TCPClientTransport, sock: socket.socket, where: str,
                      deadline: float, timeout: float) -> _Opened:
    """The client's side of the handshake on the blocking, connected ``sock``.

    No answer within ``hello_timeout`` (unless required): a plain-frame peer.  Raises
    AuthenticationError or ConnectionLostError; leaves ``sock`` non-blocking.
    """
    decoder = FrameDecoder(client.max_frame_size)
    early: List[Message] = []
    if client.handshake is False:
        sock.setblocking(False)
        return _Opened(sock, decoder, False, frozenset(), early, b"", None)
    nonce = os.urandom(32)
    hello = Message("$hello", {
        "version": PROTOCOL_VERSION,
        "features": sorted(_FEATURES),
        "nonce": nonce.hex(),
        "ping_interval": client.ping_interval,
        "max_frame_size": client.max_frame_size,
    })
    if client.name:
        hello.payload["name"] = client.name
    sock.settimeout(max(0.001, deadline - time.monotonic()))
    sock.sendall(encode(hello))
    key = client._key
    required = client.handshake is True or key is not None
    hello_deadline = deadline
    if not required:
        hello_deadline = min(deadline, time.monotonic() + client.hello_timeout)
    welcome = _await_control(sock, decoder, early, "$welcome", hello_deadline, where)
    if welcome is None:
        if required:
            raise AuthenticationError(
                f"{where} did not answer the handshake within "
                f"{hello_deadline - deadline + timeout:.1f} s (not an eventforge server, "
                "or one that speaks plain frames only)"
            )
        logger.info("tcp client: %s did not answer $hello within %s s; speaking "
                    "plain frames until it does", where, client.hello_timeout)
        sock.setblocking(False)
        return _Opened(sock, decoder, False, frozenset(), early, nonce, None)
    if welcome.get("auth"):
        if welcome.get("auth") != "hmac-sha256":
            raise AuthenticationError(f"{where} asks for unknown auth {welcome['auth']!r}")
        if key is None:
            raise AuthenticationError(f"{where} requires a shared secret (pass secret=)")
        server_nonce = _nonce_from(welcome.get("nonce"))
        if server_nonce is None:
            raise AuthenticationError(f"{where} sent an invalid nonce")
        proof = _proof(key, _AUTH_LABEL_CLIENT, nonce, server_nonce)
        sock.sendall(_control_frame("$auth", {"proof": proof.hex()}))
        ready = _await_control(sock, decoder, early, "$ready", deadline, where)
        if ready is None:
            raise AuthenticationError(f"{where} did not confirm authentication in time")
        expected = _proof(key, _AUTH_LABEL_SERVER, server_nonce, nonce)
        if not _proof_matches(expected, ready.get("proof")):
            raise AuthenticationError(f"{where} failed to prove it knows the secret")
    elif key is not None:
        raise AuthenticationError(
            f"{where} does not authenticate, so it cannot prove it knows the secret"
        )
    sock.setblocking(False)
    return _Opened(sock, decoder, True, _agreed_features(welcome), early, b"",
                   _frame_limit(welcome))


def _await_control(sock: socket.socket, decoder: FrameDecoder, early: List[Message], want: str,
                   deadline: float, where: str) -> Optional[Dict[str, Any]]:
    """Read until control frame ``want`` arrives (handshake); None at ``deadline``."""
    import socket

    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        sock.settimeout(remaining)
        try:
            data = sock.recv(65536)
        except socket.timeout:
            return None
        except OSError as exc:
            raise ConnectionLostError(
                f"{where} closed the connection during the handshake: {exc}"
            ) from None
        if not data:
            raise ConnectionLostError(
                f"{where} closed the connection during the handshake "
                "(does it require TLS or a secret?)"
            )
        try:
            bodies = decoder.feed(data)
        except FrameTooLargeError as exc:
            raise ConnectionLostError(f"{where} sent an oversize frame: {exc}") from None
        found: Optional[Dict[str, Any]] = None
        for body in bodies:
            try:
                message = decode(body)
            except FrameError as exc:
                logger.warning("tcp client: bad frame from %s during the handshake: %s", where, exc)
                continue
            payload = message.payload if isinstance(message.payload, dict) else {}
            if found is None and message.topic == want:
                found = payload
            elif message.topic == "$error":
                reason = str(payload.get("reason", "refused"))[:200]
                if payload.get("code") == "auth":
                    raise AuthenticationError(f"{where} refused the connection: {reason}")
                raise ConnectionLostError(f"{where} refused the connection: {reason}")
            elif message.topic[0] != "$":
                early.append(message)
        if found is not None:
            return found


class _Dialer:
    """Opens one connection for a :class:`TCPClientTransport`: TCP, TLS, handshake (blocking).

    The socket being set up is the client's ``_connecting``: ``close()`` aborts it with
    ``shutdown()`` instead of waiting up to ``connect_timeout``.
    """

    __slots__ = ("client",)

    def __init__(self, client: TCPClientTransport) -> None:
        self.client = client

    def connect_socket(self, timeout: float) -> socket.socket:
        """A connected socket, like ``socket.create_connection``, but abortable."""
        import socket

        c = self.client
        where = f"{c.host}:{c.port}"
        deadline = time.monotonic() + timeout
        try:
            infos = socket.getaddrinfo(c.host, c.port, 0, socket.SOCK_STREAM)
        except OSError as exc:
            raise ConnectionLostError(f"cannot connect to {where}: {exc}") from None
        error: Optional[str] = None
        for family, kind, proto, _name, address in infos:
            if c._closing.is_set():
                break
            sock = socket.socket(family, kind, proto)
            c._connecting = sock
            try:
                sock.settimeout(max(0.001, deadline - time.monotonic()))
                sock.connect(address)
            except socket.timeout:
                error = f"timed out after {timeout} s"
            except OSError as exc:
                error = str(exc)
            else:
                if not c._closing.is_set():
                    return sock
            c._connecting = None
            sock.close()
        if c._closing.is_set():
            raise TransportClosedError(f"{c._name()} is closed")
        raise ConnectionLostError(f"cannot connect to {where}: {error or 'no address'}")

    def open(self, timeout: float) -> _Opened:
        """Connect, wrap in TLS if asked, run :func:`_client_handshake` (blocking)."""
        import socket

        c = self.client
        deadline = time.monotonic() + timeout
        where = f"{c.host}:{c.port}"
        sock = self.connect_socket(timeout)
        try:
            if c._closed and c._closing.is_set():
                raise TransportClosedError(f"{c._name()} is closed")
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            if c.ssl_context is not None:
                ssl = _ssl_module()
                try:
                    sock = c.ssl_context.wrap_socket(
                        sock, server_hostname=c.server_hostname or c.host
                    )
                except (ssl.SSLError, ssl.CertificateError) as exc:
                    raise AuthenticationError(f"TLS handshake with {where} failed: {exc}") from None
                except (OSError, socket.timeout) as exc:
                    raise ConnectionLostError(
                        f"TLS handshake with {where} failed: {exc or 'timed out'} "
                        "(does the server use TLS?)"
                    ) from None
                c._connecting = sock
            return _client_handshake(c, sock, where, deadline, timeout)
        except (EventforgeError, socket.timeout):
            sock.close()
            raise
        except OSError as exc:
            sock.close()
            if c.ssl_context is not None and isinstance(exc, _ssl_module().SSLError):
                raise AuthenticationError(f"TLS session with {where} failed: {exc}") from None
            raise ConnectionLostError(f"handshake with {where} failed: {exc}") from None
        except BaseException:
            sock.close()
            raise
        finally:
            c._connecting = None

    def redial(self) -> Optional[_Opened]:
        """Retry :meth:`open` with capped exponential backoff and jitter; None once closing."""
        c = self.client
        delay = c.backoff_initial
        while not c._closing.is_set():
            jitter = 0.5 + os.urandom(1)[0] / 510.0  # 0.5 .. 1.0
            if c._nudge.wait(delay * jitter):  # close() wants the backlog out: now
                c._nudge.clear()
            if c._closing.is_set():
                return None
            c._reconnect_attempts.add()
            try:
                opened = self.open(c.connect_timeout)
            except AuthenticationError as exc:
                logger.error("tcp client: reconnect refused: %s", exc)
            except (ConnectionError, OSError, TransportClosedError) as exc:
                logger.debug("tcp client: reconnect failed: %s", exc)
            else:
                if not c._closing.is_set():
                    return opened
                opened.sock.close()
                return None
            # While close() waits to deliver the backlog, retry briskly.
            delay = min(delay * 2, 0.1 if c._closed else c.backoff_max)
        return None


class _Lifecycle:
    """A :class:`TCPClientTransport`'s connection over time, and its I/O thread.

    :meth:`install` adopts each connection opened (interest first, then every unacknowledged
    frame); :meth:`run` reconnects when one breaks.  Takes the client's locks in its order.
    """

    __slots__ = ("client",)

    def __init__(self, client: TCPClientTransport) -> None:
        self.client = client

    def start(self, opened: _Opened) -> None:
        """``connect()``: install the first connection and start the I/O thread."""
        c = self.client
        with c._lock:
            if c._closed:  # close() may have run on another thread meanwhile
                opened.sock.close()
                raise TransportClosedError(f"{c._name()} is closed")
            loop = c._loop = _Loop(f"eventforge-tcp-client-io-{c.host}:{c.port}")
            raw = getattr(loop.selector, "_selector", None)
            if c.ssl_context is None and type(raw).__name__ == "epoll":
                c._epoll = raw
            c._started = True
        c._pid = os.getpid()
        _watch_at_exit(c)
        self.install(opened)
        loop.start(self.run)

    def check_usable(self) -> None:
        """Raise why there is no connection to use (closed, failed, never connected)."""
        c = self.client
        if c._closed:
            raise TransportClosedError(f"{c._name()} is closed")
        if c._failed is not None:
            raise ConnectionLostError(c._failed)
        if not c._started:
            raise ConnectionLostError(f"not connected to {c.host}:{c.port}: call connect() first")

    def run(self) -> None:
        """The I/O thread: serve the connection, reconnect when it breaks, tick."""
        c = self.client
        loop = c._loop
        assert loop is not None
        loop.ident = threading.get_ident()
        interval = c.ping_interval
        tick_every = min(0.25, interval / 4) if interval else 0.25
        next_tick = time.monotonic() + tick_every
        try:
            while not c._closing.is_set():
                conn = c._conn
                if conn is None:
                    try:
                        if not self.reconnect():
                            break
                    except Exception:  # a bug: log it, back off, try again
                        logger.exception("tcp client: internal error while reconnecting")
                        if c._closing.wait(c.backoff_max):
                            break
                    continue
                for key, mask in loop.selector.select(max(0.0, next_tick - time.monotonic())):
                    if key.data is None:
                        loop.run_calls(drain=True)
                        continue
                    if key.data is c._conn:
                        c._serve_event(conn, mask)
                loop.run_calls()
                now = time.monotonic()
                if now >= next_tick:
                    next_tick = now + tick_every
                    try:
                        c._tick(now)
                    except Exception:
                        logger.exception("tcp client: internal error in a tick")
        except Exception:  # pragma: no cover - a bug; do not die silently
            logger.exception("tcp client: I/O loop crashed")
        finally:
            self._teardown()

    def install(self, opened: _Opened) -> None:
        """Adopt a fresh connection: interest first, then every unacknowledged message."""
        c = self.client
        sock = opened.sock
        conn = _Connection(sock, f"{c.host}:{c.port}", c.max_frame_size,
                           c._backlog.max_bytes + 1024 * 1024, c.ssl_context is not None)
        conn.decoder = opened.decoder
        conn.state = _READY
        conn.handshake = opened.handshake
        conn.features = opened.features
        conn.nonce = opened.nonce  # a $hello still unanswered: a late $welcome is adopted
        with c._lock:
            frames: List[bytes] = []
            c._confirmed.pings_sent = c._confirmed.pongs = 0
            interest = self._adopt(conn, opened.limit)
            if interest:
                frames.append(interest)
            frames.extend(c._backlog.resend(conn, c._send_limit))
            if not c._backlog.acked:
                c._backlog.written()
            if frames:
                with conn.lock:
                    data = b"".join(frames)
                    conn.out.append(data)
                    conn.out_bytes += len(data)
            c._conn = conn
            c._backlog.wake()
        loop = c._loop
        assert loop is not None
        import selectors

        conn.events = selectors.EVENT_READ
        loop.selector.register(sock, conn.events, conn)
        if opened.early:
            batch: List[Tuple[Tuple[Any, ...], Message]] = []
            with c._read_lock:  # a caller may be reading the new connection already
                for message in opened.early:
                    c._deliver(message, batch)
            if batch:
                c._dispatcher.put_many(batch)
        if frames:
            c._kick(conn)

    def _adopt(self, conn: _Connection, limit: Optional[int]) -> bytes:
        """Take up the connection's terms; the ``$interest`` to send first (lock held)."""
        c = self.client
        c._send_limit = limit if limit is not None else c.max_frame_size
        features = conn.features if conn.handshake else frozenset()
        c._backlog.acked = "ack" in features
        return c._interest.adopt(features, conn.handshake)

    def late_welcome(self, conn: _Connection, welcome: Dict[str, Any]) -> None:
        """The server answered ``$hello`` after ``hello_timeout``: adopt its terms after all."""
        c = self.client
        if welcome.get("auth"):
            self.lost_soon(conn, "the server asks for authentication; pass secret=")
            return
        with c._lock:
            if c._conn is not conn or conn.handshake:
                return
            conn.handshake = True
            conn.nonce = b""
            conn.features = _agreed_features(welcome)
            interest = self._adopt(conn, _frame_limit(welcome))
            if interest:
                conn.enqueue(interest)
        logger.info("tcp client: %s answered $hello after %s s; speaking the handshake "
                    "protocol now", conn.peer, c.hello_timeout)
        c._kick(conn)

    def lost_soon(self, conn: _Connection, reason: str, after_write: bool = False) -> None:
        """:meth:`lost` (or :meth:`lost_after_write`) on the loop thread, from any thread."""
        lose = self.lost_after_write if after_write else self.lost
        loop = self.client._loop
        if loop is not None and not loop.in_loop():
            loop.call_soon(lambda: lose(conn, reason))
        else:
            lose(conn, reason)

    def lost_after_write(self, conn: _Connection, reason: str) -> None:
        """A write failed (loop thread): first read what the server sent before closing.

        Its last ``$ack`` may still wait in the socket and spares resending what it handled.
        """
        c = self.client
        with c._read_lock:  # a caller may be reading it (_read_until)
            c._read_what_is_left(conn, lambda: c._read(conn))
        self.lost(conn, reason)  # a no-op if _read found the end and gave the connection up

    def lost(self, conn: _Connection, reason: str) -> None:
        """The connection broke (loop thread): its requests fail now; :meth:`run` reconnects."""
        c = self.client
        with c._lock:
            if c._conn is not conn:
                return
            c._conn = None
            if not c.reconnect and not c._closing.is_set():
                # In the same step as _conn: a send() in between must fail,
                # not buffer a frame that no reconnect will ever carry.
                c._failed = f"connection to {conn.peer} lost: {reason}"
            failed = c._backlog.connection_lost(conn)
        with c._read_lock:  # a caller may be reading it: wait for it to stop
            with c._sel_lock:
                with conn.lock:
                    conn.closed = True
                    conn.out.clear()
                c._close_socket(conn)
        for inbox in failed:
            inbox._fail(f"connection to {conn.peer} lost before the reply came: {reason}")
        if c._closing.is_set():
            return
        c._counts["disconnects"] += 1
        logger.warning("tcp client: lost %s (%s)%s", conn.peer, reason,
                       "; reconnecting" if c.reconnect else "")
        self._notify(False, reason)

    def _notify(self, connected: bool, detail: str) -> None:
        callback = self.client.on_connection_change
        if callback is None:
            return
        try:
            callback(connected, detail)
        except Exception:
            logger.exception("tcp client: on_connection_change callback failed")

    def reconnect(self) -> bool:
        """Open a new connection (:meth:`_Dialer.redial`) and install it; False to stop."""
        c = self.client
        if not c.reconnect or c._closing.is_set():
            return False
        opened = _Dialer(c).redial()
        if opened is None:
            return False
        c._reconnects.add()  # before any frame goes out on it
        self.install(opened)
        logger.info("tcp client: reconnected to %s:%s", c.host, c.port)
        self._notify(True, f"reconnected to {c.host}:{c.port}")
        return True

    def stop(self) -> None:
        """Abort a connection attempt, end the I/O thread, then the callbacks (close)."""
        c = self.client
        c._closing.set()
        c._nudge.set()
        connecting = c._connecting
        if connecting is not None:
            try:  # wakes a blocked connect() or handshake read; its owner closes it
                connecting.shutdown(2)  # socket.SHUT_RDWR
            except OSError:
                pass
        loop = c._loop
        if loop is not None:
            loop.wake()
            if loop.thread is not None and loop.thread is not threading.current_thread():
                loop.thread.join(c.connect_timeout + 2.0)
        c._dispatcher.drain(1.0)  # callbacks for what arrived before close() run
        c._local.close()  # then a callback still waiting on an inbox returns
        c._dispatcher.stop(1.0)

    def _teardown(self) -> None:
        """The loop thread ends: flush what is queued (up to 1 s) and close the socket."""
        c = self.client
        with c._lock:
            conn = c._conn
            c._conn = None
        if conn is not None:
            with c._read_lock, c._sel_lock, conn.lock:
                chunks = [bytes(conn.cur)] if conn.cur is not None else []
                chunks.extend(conn.out)
                conn.out.clear()
                conn.cur = None
                conn.closed = True
            sock = conn.sock
            try:
                if chunks:
                    sock.settimeout(1.0)
                    sock.sendall(b"".join(chunks))
                if not conn.tls:
                    # Unread input would make close() send RST, and an RST may
                    # discard what the server has not read yet: send FIN, then
                    # drop what is waiting here before closing.
                    sock.shutdown(1)  # socket.SHUT_WR
                    sock.setblocking(False)
                    while sock.recv(_RECV_SIZE):
                        pass
            except OSError:
                pass
            try:
                sock.close()
            except OSError:
                pass
        if c._loop is not None:
            c._loop.close()


class TCPClientTransport(_TCPEndpoint):
    """A connection to a :class:`TCPServerTransport` (or an eventforge 0.1 server).

    Call :meth:`connect` before use.  ``send`` writes from the caller's thread when the
    connection is idle, else queues (frames never interleave).  ``subscribe``, ``receive`` and
    request inboxes tell the server this client's *interest*: it sends only matching messages.
    Subscriber callbacks run on one dispatcher thread, in arrival order; one that waits for a
    reply (a request, an RPC call, a ``receive``) first hands that role to a new thread, so the
    reply may come through another subscriber.  A thread waiting for a reply reads the socket
    itself for a few milliseconds, so the reply wakes it directly.

    A dropped connection is reopened (``reconnect=True``) with capped exponential backoff and
    jitter (``backoff_initial`` .. ``backoff_max``); the interest, then every message the server
    has not acknowledged, is sent again in order.  Meanwhile up to ``max_pending`` messages (and
    ``max_pending_bytes``) wait, beyond that ``send`` raises TransportFullError; while
    connected, a full buffer first makes ``send`` wait up to ``send_timeout`` s for
    acknowledgements (slowing a fast publisher down).  A server silent for two ``ping_interval``
    s is taken for dead.

    ``secret`` runs the mutual HMAC-SHA256 handshake; ``ssl_context`` (a client-side
    :class:`ssl.SSLContext`) enables TLS, checked against ``server_hostname`` (default:
    ``host``).  A server that does not answer ``$hello`` within ``hello_timeout`` is taken for a
    plain-frame peer (the eventforge 0.1 server) until its ``$welcome`` arrives, if ever; then
    the client switches to the handshake and sends its interest.  ``handshake=False`` skips the
    hello, ``handshake=True`` requires it.  ``name`` goes in the hello, for the server's
    :class:`Monitor`.

    ``send`` raises FrameTooLargeError above the server's ``max_frame_size``.  A buffered
    message a reconnected server can no longer take, or keeps refusing, is dropped, logged and
    counted (``too_large``, ``refused``).  A request whose caller stopped waiting (inbox closed)
    is withdrawn; one whose connection broke fails its caller at once (ConnectionLostError).
    :meth:`flush` waits until the server processed all sent before it; :meth:`close` (and
    interpreter exit) delivers what was accepted, within its ``timeout``.
    ``on_connection_change(connected, detail)`` is called on the I/O thread when the connection
    is lost and when it is back.

    Collaborators: :class:`_Lifecycle` (the connection over time, the I/O thread),
    :class:`_Dialer`, :class:`_Backlog`, :class:`_Interest`, :class:`_Confirmations`.  Locks,
    outermost first: ``_connect_lock`` (one ``connect()`` at a time), ``_read_lock`` (whoever
    decodes the socket: the I/O thread or a caller reading its reply), ``_lock`` (the state,
    with the backlog, interest and confirmations; ``_backlog.changed`` is a condition on it),
    ``_sel_lock`` (the selector registration; never held with ``_lock``), a connection's
    ``conn.lock``.  No lock is held while user code runs.
    """

    _log_name = "tcp client"
    _hold_bursts = True

    def __init__(
        self,
        host: str = "localhost",
        port: int = DEFAULT_TCP_PORT,
        *,
        secret: Any = None,
        ssl_context: Optional[ssl.SSLContext] = None,
        server_hostname: Optional[str] = None,
        reconnect: bool = True,
        backoff_initial: float = 0.05,
        backoff_max: float = 5.0,
        max_pending: int = 10000,
        max_pending_bytes: int = 64 * 1024 * 1024,
        ping_interval: Optional[float] = 5.0,
        connect_timeout: float = 5.0,
        hello_timeout: float = 1.0,
        handshake: Optional[bool] = None,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        max_queue_size: int = 1000,
        send_timeout: float = 10.0,
        on_connection_change: Optional[Callable[[bool, str], Any]] = None,
        name: Optional[str] = None,
    ) -> None:
        if not isinstance(port, int) or not 0 < port <= 65535:
            raise ValueError(f"port must be an int in 1..65535, not {port!r}")
        if not isinstance(max_pending, int) or max_pending < 1:
            raise ValueError(f"max_pending must be a positive int, not {max_pending!r}")
        if backoff_initial <= 0 or backoff_max < backoff_initial:
            raise ValueError("need 0 < backoff_initial <= backoff_max")
        self.host = host
        self.port = port
        self._key = _secret_key(secret)
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname
        self.reconnect = reconnect
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.ping_interval = ping_interval
        self.connect_timeout = connect_timeout
        self.hello_timeout = hello_timeout
        self.handshake = handshake
        self.max_frame_size = max_frame_size
        self.send_timeout = send_timeout
        self.name = name  # sent in $hello; the server's monitor shows it
        self.on_connection_change = on_connection_change
        self._send_limit = max_frame_size  # the server's max_frame_size, once known
        self._local = MemoryTransport(max_queue_size)
        self._lock = threading.Lock()
        self._connect_lock = threading.Lock()
        self._interest = _Interest()
        self._confirmed = _Confirmations(self)  # what send, flush() and close() wait for
        self._wait_for_space = self._confirmed.room  # send's wait for acknowledgements
        self._life = _Lifecycle(self)  # the connection over time, and the I/O thread
        self._conn: Optional[_Connection] = None
        self._loop: Optional[_Loop] = None
        self._dispatcher = _Dispatcher(
            f"eventforge-tcp-client-dispatch-{host}:{port}", self._local, self._dispatch_low
        )
        self._read_lock = threading.RLock()  # see "Locks" above
        self._sel_lock = threading.Lock()
        self._epoll: Any = None  # the loop's epoll object, if the selector is epoll
        self._closing = threading.Event()
        self._nudge = threading.Event()  # ends a reconnect's backoff wait early
        self._connecting: Optional[socket.socket] = None  # being set up: close() aborts it
        self._started = False
        self._closed = False
        self._failed: Optional[str] = None
        # Ints bumped under _lock (send, _Backlog) or under _read_lock (decoding).
        self._counts: Dict[str, int] = collections.defaultdict(int)
        self._counts.update(dict.fromkeys(_CLIENT_COUNTERS, 0))
        self._backlog = _Backlog(self._lock, self._counts, max_pending, max_pending_bytes)
        self._reconnect_attempts = _Counter()  # bumped by the I/O thread, read by stats
        self._reconnects = _Counter()
        self._messages_out = 0  # under _lock
        self._pid = 0

    max_pending = property(lambda self: self._backlog.max_items,
                           lambda self, n: setattr(self._backlog, "max_items", n))
    max_pending_bytes = property(lambda self: self._backlog.max_bytes,
                                 lambda self, n: setattr(self._backlog, "max_bytes", n))

    # -- lifecycle --------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True while a connection to the server is up."""
        return self._conn is not None

    @property
    def mode(self) -> Optional[str]:
        """``"handshake"`` (our server), ``"frames"`` (a plain-frame server) or None.

        ``"frames"`` becomes ``"handshake"`` if a late ``$welcome`` arrives.
        """
        conn = self._conn
        return None if conn is None else "handshake" if conn.handshake else "frames"

    def connect(self, timeout: Optional[float] = None) -> TCPClientTransport:
        """Connect and handshake within ``timeout`` seconds (default ``connect_timeout``).

        Raises ConnectionLostError (a ConnectionError) if the server cannot be reached and
        AuthenticationError if the secret or TLS handshake fails.  Returns self.
        """
        with self._connect_lock:  # one connect at a time; later ones see _started
            with self._lock:
                if self._closed:
                    raise TransportClosedError(f"{self._name()} is closed")
                if self._started:
                    return self
            opened = _Dialer(self).open(self.connect_timeout if timeout is None else timeout)
            self._life.start(opened)
        return self

    def _name(self) -> str:
        return f"TCPClientTransport to {self.host}:{self.port}"

    def close(self, timeout: float = _CLOSE_TIMEOUT) -> None:
        """Deliver what was accepted, then close the socket and stop every thread.

        New sends fail at once; messages already accepted are given up to ``timeout`` seconds to
        reach the server: until acknowledged (a server with the feature "ack"), written (a
        frame-only server), or sent after a reconnect that is under way.  What is still
        undelivered then is logged.  A connection attempt in progress is abandoned at once.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._backlog.changed.notify_all()
        _open_clients.discard(self)
        loop = self._loop
        if self._started and loop is not None and not loop.in_loop():
            self._confirmed.delivered(time.monotonic() + timeout)
        self._life.stop()

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until the server has processed everything sent before this call.

        Interest included: once ``flush`` returns, messages published by others reach this
        client's new subscriptions.  One ``$flush``/ ``$flushed`` round trip (an older handshake
        server: ``$ping``/``$pong``, then the acknowledgement of every message sent before).
        Returns True once confirmed; False with a frame-only server (eventforge 0.1), which
        cannot confirm anything: then once every queued frame was written.  While disconnected
        it waits for the reconnect.  Raises EventforgeTimeoutError after ``timeout`` seconds,
        ConnectionLostError if the connection is lost for good, TransportClosedError after
        :meth:`close`.
        """
        loop = self._loop
        if loop is not None and loop.in_loop():
            raise RuntimeError("flush() cannot wait on the client's own I/O thread")
        return self._confirmed.flush(time.monotonic() + timeout)

    # -- Transport API ----------------------------------------------------------------

    def send(self, message: Message) -> None:
        """Send ``message`` to the server; queue it while reconnecting.

        Raises FrameTooLargeError for a message over the server's ``max_frame_size``,
        TransportFullError when ``max_pending`` messages already wait, ConnectionLostError
        before :meth:`connect` or after a failure with ``reconnect=False``, TransportClosedError
        after :meth:`close`.
        """
        topic = message.topic
        if type(topic) is not str or topic not in _VALID_TOPICS:
            validate_topic(topic)
        try:
            frame = encode(message, max_frame_size=self._send_limit)
        except FrameTooLargeError as exc:
            raise FrameTooLargeError(
                f"{exc} (the largest frame {self.host}:{self.port} takes)"
            ) from None
        headers, deadline = message.headers, None
        if headers:  # a request's _ttl_ms: its caller's deadline, for a resend
            ttl = headers.get("_ttl_ms")
            deadline = _monotonic() + ttl / 1000.0 if type(ttl) is int and ttl >= 0 else None
        reply_to, size, backlog = message.reply_to, len(frame), self._backlog
        claimed = False
        with self._lock:
            conn = self._conn
            if conn is not None and backlog.acked and (  # not backlog.has_room(), inlined
                    len(backlog.items) >= backlog.max_items
                    or backlog.bytes + size > backlog.max_bytes):
                conn = self._wait_for_space(size)
            if conn is not None and not self._closed:  # _Connection.enqueue, inlined
                with conn.lock:
                    if (conn.out_bytes + size > conn.max_outbound or self._interest.deferred
                            or self._interest.removals):
                        self._ahead_of(conn, size, reply_to)
                    claimed = conn.claim(frame, _perf_counter())  # idle: written below
                    if not claimed:
                        conn.out.append(frame)
                        conn.out_bytes += size
                item = [backlog.seq + 1, frame, 0, deadline] if backlog.acked else None
                if item is not None:  # _Backlog.add, inlined
                    backlog.items.append(item)
                    backlog.bytes += size
                backlog.seq += 1  # every data frame of the connection, as the server counts
                self._messages_out += 1
            else:
                item = self._send_offline(frame, deadline)
            if reply_to is not None and reply_to in backlog.requests:  # a request: on conn
                backlog.requests[reply_to][1:] = conn, item  # now (or waiting for one)
        if claimed:
            self._flush(conn, frame)  # type: ignore[arg-type]
        elif conn is not None:
            self._kick(conn)
            if reply_to is not None and conn.scheduled:
                conn.urgent = True  # a request: the I/O thread lets no burst grow now

    def _ahead_of(self, conn: _Connection, size: int, reply_to: Optional[str]) -> None:
        """Queue what precedes a ``size``-byte frame on ``conn`` (send's uncommon cases).

        Locks held; raises TransportFullError without room.
        """
        if conn.out_bytes + size > conn.max_outbound:
            self._counts["full"] += 1
            raise TransportFullError(f"{conn.out_bytes} bytes wait for the server; "
                                     f"max_pending_bytes={self._backlog.max_bytes}")
        extra = self._interest.before(reply_to)
        if extra:
            conn.out.append(extra)
            conn.out_bytes += len(extra)

    def _send_offline(self, frame: bytes, deadline: Optional[float]) -> List[Any]:
        # Called with self._lock held while there is no connection.
        self._life.check_usable()
        return self._backlog.buffer(frame, deadline)

    def receive(self, topic: str, timeout: Optional[float] = None) -> Optional[Message]:
        """Take the next message on the exact ``topic``.

        The first call registers a lasting interest in ``topic`` with the server; from then on
        messages on it wait here (at most ``max_queue_size``) until received.
        """
        self._want_receive(topic)
        if timeout is None or timeout > 0:
            self._dispatcher.hand_off_if_current()
        return self._local.receive(topic, timeout)

    async def receive_async(self, topic: str, timeout: Optional[float] = None) -> Optional[Message]:
        """Asyncio-native :meth:`receive`."""
        self._want_receive(topic)
        return await self._local.receive_async(topic, timeout)

    def _subscribed(self, pattern: str, subscription_id: str) -> str:
        with self._lock:
            self._interest.patterns[subscription_id] = pattern
        self._interest_add(pattern)
        return subscription_id

    def _unsubscribed(self, subscription_id: str) -> None:
        with self._lock:
            pattern = self._interest.patterns.pop(subscription_id, None)
        if pattern is not None:  # the last user's withdrawal waits for a tick
            self._interest_remove(pattern)

    def open_inbox(self, topic: str) -> Inbox:
        """Open an inbox on ``topic`` and tell the server, ahead of the next frame sent.

        An inbox topic (:data:`INBOX_PREFIXES`) named as ``reply_to`` by the next message sent
        needs no frame of its own when the server speaks the feature "reply": the request itself
        tells the server.  Closing the inbox withdraws a request that named it and is still
        waiting for a connection or an acknowledgement: it is never resent.
        """
        if self._closed:
            raise TransportClosedError(f"{self._name()} is closed")
        # A subclass that fails on a lost connection and may read the socket.
        inbox = self._local._open_inbox(topic, _ClientInbox, self._inbox_closed)
        inbox._transport = self  # type: ignore[attr-defined]
        if self._epoll is not None:
            inbox._read_ahead = True  # type: ignore[attr-defined]
        self._interest_add(topic, flush=False, defer=topic.startswith(INBOX_PREFIXES),
                           inbox=inbox)
        return inbox

    def _inbox_closed(self, inbox: Inbox) -> None:
        """Withdraw the inbox's interest and any request of it not yet acknowledged."""
        self._interest_remove(inbox.topic, inbox)

    @property
    def stats(self) -> Dict[str, Any]:
        """Local delivery counters plus connection and buffering counters."""
        stats: Dict[str, Any] = dict(self._local.stats)
        stats.update(self._counts)
        stats["messages_out"] = self._messages_out
        stats["reconnect_attempts"] = self._reconnect_attempts.value
        stats["reconnects"] = self._reconnects.value
        stats["connected"] = self._conn is not None
        stats["pending"] = len(self._backlog.items)
        stats["pending_bytes"] = self._backlog.bytes
        stats["interest"] = len(self._interest.counts)
        stats["dispatch_backlog"] = self._dispatcher.backlog
        return stats

    def debug_state(self) -> Dict[str, Any]:
        """A snapshot of internal state, for tests and debugging (keys may change).

        ``interest``: pattern -> users; ``features``: agreed (empty without a handshake);
        ``implicit``: requests tell the server of their inbox; ``socket``: the socket or None;
        ``connecting``: an attempt is under way; ``io_thread_alive``: the I/O thread runs.
        """
        with self._lock:
            conn, loop = self._conn, self._loop
            return {
                "interest": dict(self._interest.counts), "implicit": self._interest.implicit,
                "features": conn.features if conn is not None and conn.handshake
                else frozenset(),
                "socket": conn.sock if conn is not None else None,
                "connecting": self._connecting is not None,
                "io_thread_alive": bool(loop and loop.thread and loop.thread.is_alive()),
            }

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("connected" if self._conn else "disconnected")
        return f"<TCPClientTransport {self.host}:{self.port} {state}>"

    # -- interest -----------------------------------------------------------------------

    def _want_receive(self, topic: str) -> None:
        _refuse_receive_pattern(topic)
        validate_topic(topic)
        receiving = self._interest.receiving
        if topic not in receiving:
            with self._lock:
                if topic in receiving:
                    return
                receiving[topic] = None
            self._interest_add(topic)

    def _interest_add(
        self, pattern: str, flush: bool = True, defer: bool = False,
        inbox: Optional[Inbox] = None,
    ) -> None:
        with self._lock:
            if inbox is not None:
                self._backlog.track(pattern, inbox)
            conn = self._conn
            frame = self._interest.add(pattern, conn is not None and conn.handshake, defer)
            if conn is None or not frame:
                return
            conn.enqueue(frame)
        if flush:
            self._kick(conn)

    def _interest_remove(self, pattern: str, inbox: Optional[Inbox] = None) -> None:
        # Not urgent: rides along with the next $interest, or leaves on a tick.
        with self._lock:
            if inbox is not None:
                self._backlog.untrack(pattern, inbox)
            conn = self._conn
            self._interest.remove(pattern, conn is not None and conn.handshake and not self._closed)

    # -- connection set-up ------------------------------------------------------------------

    # -- writing ------------------------------------------------------------------------------

    def _live(self, conn: _Connection) -> bool:
        return self._conn is conn

    def _write_on_loop(self, conn: _Connection) -> None:
        if conn.tls or not conn.blocked:
            self._flush(conn)

    def _write_failed(self, conn: _Connection, exc: OSError) -> None:
        self._life.lost_soon(conn, f"write failed: {exc}", after_write=True)

    def _update_events(self, conn: _Connection) -> None:
        with self._sel_lock:
            if conn.closed or self._conn is not conn:
                return
            if not conn.set_events(self._loop.selector):  # type: ignore[union-attr]
                return
            events = conn.events
            if conn.caller_reading and events:
                self._epoll.modify(conn.sock.fileno(), _epoll_mask(events, False))

    def _read_until(self, inbox: Inbox, budget: float) -> None:
        """Read the socket from a caller's thread until ``inbox`` has a message (``budget`` s).

        Only if the I/O thread is not reading; meanwhile its epoll does not watch the socket for
        input, so the reply wakes this thread and no other.
        """
        conn = self._conn
        if conn is None or conn.paused or not self._read_lock.acquire(False):
            return
        try:
            epoll = self._epoll
            with self._sel_lock:
                if self._conn is not conn or conn.closed or not conn.events:
                    return
                fd = conn.sock.fileno()
                conn.caller_reading = True
                epoll.modify(fd, _epoll_mask(conn.events, False))
            try:
                poller = conn.poller
                if poller is None:
                    import select

                    poller = conn.poller = select.poll()
                    poller.register(fd, select.POLLIN)
                deadline = _perf_counter() + budget
                while not inbox._messages and not inbox._closed:
                    remaining = deadline - _perf_counter()
                    if remaining <= 0:
                        break
                    if poller.poll(max(1, int(remaining * 1000))) and not self._read(conn):
                        break
            finally:
                with self._sel_lock:
                    conn.caller_reading = False
                    if not conn.closed and conn.events:
                        epoll.modify(fd, _epoll_mask(conn.events, True))
        except OSError:  # the socket went away meanwhile: the I/O thread handles it
            pass
        finally:
            self._read_lock.release()

    # -- loop thread ------------------------------------------------------------------------------

    def _on_readable(self, conn: _Connection) -> None:
        if self._read_lock.acquire(False):  # else a caller is reading it
            try:
                self._read(conn)
            finally:
                self._read_lock.release()

    def _read(self, conn: _Connection) -> bool:
        """Read and handle what arrived (holding _read_lock); False if the connection broke."""
        loop = self._loop
        assert loop is not None
        bodies = self._read_frames(conn)
        if bodies is None:
            return False
        batch: List[Tuple[Tuple[Any, ...], Message]] = []
        for body in bodies:
            self._on_frame(conn, body, batch)
        if batch:
            self._dispatcher.put_many(batch)
            if self._dispatcher.high and not conn.paused:
                conn.paused = True
                if loop.in_loop():
                    self._update_events(conn)
                else:
                    loop.call_soon(lambda: self._update_events(conn))
        return True

    def _may_read(self, conn: _Connection) -> bool:
        return self._conn is conn

    def _internal_error(self, conn: _Connection) -> None:
        self._life.lost(conn, "internal error (see traceback)")

    def _read_failed(self, conn: _Connection, exc: OSError) -> None:
        self._life.lost_soon(conn, f"read failed: {exc}")

    def _peer_closed(self, conn: _Connection) -> None:
        self._life.lost_soon(conn, "server closed the connection")

    def _oversize(self, conn: _Connection, exc: FrameTooLargeError, data: bytes) -> None:
        self._counts["oversize_frames"] += 1
        self._life.lost_soon(conn, f"server sent an oversize frame: {exc}")

    def _bad_frame(self, conn: _Connection, exc: FrameError) -> None:
        self._counts["frame_errors"] += 1
        logger.warning("tcp client: rejected a frame from %s: %s", conn.peer, exc)

    def _on_message(
        self, conn: _Connection, message: Message, body: bytes, batch: Optional[List[Any]]
    ) -> None:
        self._counts["messages_in"] += 1
        assert batch is not None
        self._deliver(message, batch)

    def _dead(self, conn: _Connection, reason: str) -> None:
        self._counts["dead_peers"] += 1
        self._life.lost(conn, reason)

    def _send_ping(self, conn: _Connection) -> None:
        with self._lock:
            self._confirmed.pings_sent += 1
            conn.enqueue(_control_frame("$ping", {}))

    def _deliver(self, message: Message, batch: List[Tuple[Tuple[Any, ...], Message]]) -> None:
        topic = message.topic
        try:
            taken = topic not in self._interest.receiving
            subscriptions = self._local._deliver(message, taken=taken)
        except TransportFullError as exc:
            self._counts["mailbox_full"] += 1
            logger.warning("tcp client: dropped %s: %s", message.id, exc)
            return
        except TransportClosedError:
            return
        if subscriptions:
            batch.append((subscriptions, message))

    def _on_control(self, conn: _Connection, topic: str, payload: Any) -> None:
        if not isinstance(payload, dict):
            payload = {}
        if topic == "$ack":
            acked = payload.get("n")
            if isinstance(acked, int):
                with self._lock:
                    self._backlog.acknowledge(acked)
        elif topic == "$ping":
            if conn.enqueue(_control_frame("$pong", {})) == _OK:
                self._flush(conn)
        elif topic == "$pong" or topic == "$flushed":
            self._confirmed.confirmed(conn, topic, payload)
        elif topic == "$welcome" and not conn.handshake and conn.nonce:
            self._life.late_welcome(conn, payload)
        elif topic == "$error":
            reason = str(payload.get("reason"))[:200]
            logger.warning("tcp client: %s reports: %s", conn.peer, reason)
        else:
            self._counts["protocol_errors"] += 1
            logger.debug("tcp client: ignored control frame %r", topic)

    def _tick(self, now: float) -> None:
        conn = self._conn
        if conn is None or not self._check_alive(conn, now):
            return
        if self._interest.pending():  # withdrawn interest leaves at the latest now
            with self._lock:
                if self._interest.pending() and self._conn is conn:
                    conn.enqueue(self._interest.changes())
        if conn.out_bytes and not conn.blocked:
            self._flush(conn)

    def _resume_reading(self) -> None:
        conn = self._conn
        if conn is not None and conn.paused:
            conn.paused = False
            self._update_events(conn)

# ---------------------------------------------------------------------------
# 12. Remote queues: RemoteQueue over any Transport
# ---------------------------------------------------------------------------
class RemoteQueue:
    """A push-only switchboard: named peers reached over TCP, plus an optional local queue.

    :meth:`connect` opens and owns a :class:`TCPClientTransport` to each
    peer; :meth:`send` pushes a message to one peer, :meth:`broadcast` to
    all.  A node that also receives passes ``local=`` (a :class:`MessageQueue`,
    typically on a started :class:`TCPServerTransport`; anything else, a bare
    transport included, is a TypeError) and subscribes to it with
    :meth:`subscribe` / :meth:`on`.  There is no way
    to pull from a peer's topics: that direction is request-reply (RPC).

    Every message carries the header ``source_node`` (this node's id) unless
    the caller sets it.  A peer that fails during :meth:`broadcast` does not
    stop the others: the failure is logged, counted in :attr:`stats`, kept
    in :attr:`last_errors` and passed to ``on_error(node_id, exc)`` if given.

    Locks, outermost first: ``_lock`` (the peer table), then nothing: the
    peers' transports and the ``_sent``/``_send_failures`` counters are
    used after it is released.
    """

    def __init__(
        self,
        node_id: str,
        *,
        local: Optional[MessageQueue] = None,
        on_error: Optional[Callable[[str, BaseException], Any]] = None,
    ) -> None:
        if not isinstance(node_id, str) or not node_id:
            raise ValueError("node_id must be a non-empty str")
        given: Any = local  # checked at run time, whatever the annotation says
        if given is not None and not isinstance(given, MessageQueue):
            hint = (" (a transport: wrap it, local=MessageQueue(transport=...))"
                    if isinstance(given, Transport) else "")
            raise TypeError(f"local must be a MessageQueue or None, not "
                            f"{type(given).__name__}{hint}")
        self.node_id = node_id
        self.local = local
        self.on_error = on_error
        self._lock = threading.Lock()
        self._peers: Dict[str, TCPClientTransport] = {}
        self.last_errors: Dict[str, BaseException] = {}
        self._sent = _Counter()  # send() and broadcast() run on any thread
        self._send_failures = _Counter()
        self._closed = False

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    def peer_transport(self, node_id: str) -> TCPClientTransport:
        """The :class:`TCPClientTransport` linking to peer ``node_id`` (KeyError if none).

        For its ``stats``, ``connected`` state or ``flush()``; sending goes
        through :meth:`send`, closing through :meth:`disconnect`.
        """
        with self._lock:
            return self._peers[node_id]

    @property
    def peers(self) -> List[str]:
        """Ids of the peers connected with :meth:`connect`, in connection order."""
        with self._lock:
            return list(self._peers)

    def connect(self, node_id: str, host: str, port: int, **options: Any) -> None:
        """Open a TCP link to peer ``node_id`` at ``host:port`` and own it.

        ``options`` go to :class:`TCPClientTransport` (``secret``,
        ``ssl_context``, ``reconnect`` ...); ``timeout`` bounds the connect.
        Connecting an id again replaces its link.  Raises ConnectionError if
        the peer cannot be reached.
        """
        if not isinstance(node_id, str) or not node_id:
            raise ValueError("node_id must be a non-empty str")
        if self._closed:
            raise TransportClosedError("RemoteQueue is closed")
        timeout = options.pop("timeout", None)
        transport = TCPClientTransport(host, port, **options)
        transport.connect(timeout)
        with self._lock:
            closed_meanwhile = self.closed
            if closed_meanwhile:
                old: Optional[TCPClientTransport] = transport
            else:
                old = self._peers.pop(node_id, None)
                self._peers[node_id] = transport
        if old is not None:
            old.close()
        if closed_meanwhile:
            raise TransportClosedError("RemoteQueue is closed")

    def disconnect(self, node_id: str) -> bool:
        """Close the link to ``node_id``; False if there was none."""
        with self._lock:
            transport = self._peers.pop(node_id, None)
        if transport is None:
            return False
        transport.close()
        return True

    def _message(self, topic: str, payload: Any, headers: Dict[str, Any]) -> Message:
        headers.setdefault("source_node", self.node_id)
        return Message(topic, payload, headers=headers)

    def send(self, node_id: str, topic: str, payload: Any = None, **headers: Any) -> str:
        """Push a message to the peer ``node_id``; returns the message id.

        Raises TransportClosedError after :meth:`close`, KeyError for an
        unknown peer, TransportFullError if its link buffers too much while
        reconnecting.
        """
        with self._lock:
            self._check_open()
            transport = self._peers.get(node_id)
        if transport is None:
            raise KeyError(f"unknown peer {node_id!r}; connected peers: {sorted(self._peers)}")
        message = self._message(topic, payload, headers)
        transport.send(message)
        self._sent.add()
        return message.id

    def broadcast(self, topic: str, payload: Any = None, **headers: Any) -> Dict[str, str]:
        """Push the same message to every peer; returns ``{node_id: message_id}``.

        Peers that failed are missing from the result; their errors are in
        :attr:`last_errors` (reset on every call), logged and counted.  A
        broadcast that reaches no peer raises instead of returning ``{}``:
        TransportClosedError after :meth:`close`, TransportError when no peer
        is connected or every peer failed (the first failure is its cause).
        """
        validate_topic(topic)
        with self._lock:
            self._check_open()
            peers = list(self._peers.items())
        if not peers:
            raise TransportError(
                f"RemoteQueue {self.node_id!r} has no peers to broadcast {topic!r} to; "
                "connect() one first"
            )
        message = self._message(topic, payload, headers)
        sent: Dict[str, str] = {}
        errors: Dict[str, BaseException] = {}
        for node_id, transport in peers:
            try:
                transport.send(message)
            except (EventforgeError, OSError) as exc:
                errors[node_id] = exc
                self._send_failures.add()
                logger.warning("remote %s: broadcast of %s to %s failed: %s",
                               self.node_id, message.id, node_id, exc)
                if self.on_error is not None:
                    try:
                        self.on_error(node_id, exc)
                    except BaseException as hook_exc:  # shown, never propagated
                        _reraise_interrupt(hook_exc)
                        _report_unhandled(f"remote {self.node_id}: on_error hook failed",
                                          hook_exc)
            else:
                sent[node_id] = message.id
                self._sent.add()
        self.last_errors = errors
        if not sent:
            first = next(iter(errors.values()))
            raise TransportError(
                f"broadcast of {message.id} on {topic!r} reached none of the "
                f"{len(errors)} peer(s): " + "; ".join(f"{n}: {e}" for n, e in errors.items())
            ) from first
        return sent

    def _check_open(self) -> None:
        # Called with self._lock held.
        if self._closed:
            raise TransportClosedError(f"RemoteQueue {self.node_id!r} is closed")

    def _require_local(self) -> MessageQueue:
        if self.local is None:
            raise RuntimeError(
                f"RemoteQueue {self.node_id!r} has no local queue to receive on; "
                "pass local=MessageQueue(transport=TCPServerTransport(...))"
            )
        return self.local

    def subscribe(self, topic: str, handler: Callable[[Message], Any]) -> str:
        """Subscribe ``handler`` on the local queue; RuntimeError without one."""
        return self._require_local().subscribe(topic, handler)

    def on(self, topic: str, handler: Optional[Callable[[Message], Any]] = None) -> Any:
        """Decorator (or direct) form of :meth:`subscribe`."""
        return self._require_local().on(topic, handler)

    def unsubscribe(self, handler_id: Any) -> bool:
        """Remove a local subscription; RuntimeError without a local queue."""
        return self._require_local().unsubscribe(handler_id)

    @property
    def stats(self) -> Dict[str, Any]:
        """Send counters, plus each peer link's transport counters."""
        with self._lock:
            peers = dict(self._peers)
        return {
            "sent": self._sent.value,
            "send_failures": self._send_failures.value,
            "peers": {node: transport.stats for node, transport in peers.items()},
        }

    def close(self, timeout: float = _CLOSE_TIMEOUT) -> None:
        """Close every peer link, then the local queue.

        What the links already accepted gets ``timeout`` seconds in all (not
        per peer) to reach the peers; see :meth:`TCPClientTransport.close`.
        """
        with self._lock:
            self._closed = True
            peers = list(self._peers.values())
            self._peers.clear()
        deadline = _monotonic() + timeout
        for transport in peers:
            transport.close(max(0.0, deadline - _monotonic()))
        if self.local is not None:
            self.local.close()

    def __enter__(self) -> RemoteQueue:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<RemoteQueue {self.node_id!r} peers={self.peers}>"


# ---------------------------------------------------------------------------
# 13. Monitor: health, JSON, Prometheus metrics and a small page over HTTP
# ---------------------------------------------------------------------------

# Modelled on NATS's monitoring port.  The monitor owns no counter: every
# request asks the watched components for snapshots (their ``stats``,
# ``connections()``, ``method_stats()``, a queue's ``monitor_snapshot()``),
# each copied under the component's own lock, so publishing, dispatch and
# framing do no extra work for it.  Bounded everywhere: lists are paged
# (``limit`` at most 1000), metric label values are capped (the rest fold
# into ``__other__``) and are subscription patterns or registered names,
# never raw topics.  ``http.server`` is imported when a monitor starts.

#: Default port of :class:`Monitor` (the one NATS uses for monitoring).
DEFAULT_MONITOR_PORT = 8222
#: Environment variable a :class:`Monitor` reads its token from.
MONITOR_TOKEN_ENV = "EVENTFORGE_MONITOR_TOKEN"

_PAGE_DEFAULT, _PAGE_MAX = 100, 1000
_MAX_OFFSET = 10 ** 9
_MAX_URL = 2048
_MAX_QUERY_FIELDS = 16
_MONITOR_TIMEOUT = 5.0  # per-socket read/write timeout of a monitor request
_MONITOR_THREADS = 4  # requests served at once; more get a 503
_CT_JSON = "application/json"
_CT_HTML = "text/html; charset=utf-8"
_CT_PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"
_CT_OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"
_MONITOR_HEADERS: Tuple[Tuple[str, str], ...] = (
    ("Content-Security-Policy", "default-src 'self'"),
    ("X-Content-Type-Options", "nosniff"),
    ("Cache-Control", "no-store"),
    ("Referrer-Policy", "no-referrer"),
    ("X-Frame-Options", "DENY"),
)
_LOOPBACK_NAMES = frozenset(("localhost", "127.0.0.1", "::1"))
_OTHER = "__other__"
_CONNZ_SORTS = {  # sort= value -> (snapshot key, descending)
    "cid": ("cid", False), "start": ("start", False), "last": ("last_activity", True),
    "idle": ("last_activity", False), "pending": ("pending_bytes", True),
    "msgs_from": ("in_msgs", True), "msgs_to": ("out_frames", True),
    "bytes_from": ("in_bytes", True), "bytes_to": ("out_bytes", True),
    "subs": ("subscriptions", True), "stop": ("stop", True),
}
# TCP server counters that close a connection or lose a message, by where
# the monitor shows them.  Normal closes are "disconnects"/"closed_by_server".
_CONNECTION_FAILURES = (
    "refused_connections", "accept_errors", "resets", "truncated_frames", "frame_timeouts",
    "handshake_timeouts", "auth_failures", "tls_failures", "protocol_errors",
    "slow_consumers", "dead_peers", "oversize_frames", "internal_errors", "frame_only_refused",
)
_IN_FAILURES = ("frame_errors", "mailbox_full", "expired", "unhandled_at_close")
_OUT_FAILURES = ("dropped_topic_full", "dropped_buffer_full", "dropped_no_inbox",
                 "handler_errors", "full", "oversize_for_peer", "too_large", "refused")
_QUEUE_GAUGES = ("ready", "in_flight", "delayed", "dead_letters", "oldest_ready_age_seconds")
_QUEUE_TOTALS = ("acked_total", "nacked_total", "redelivered_total", "dead_lettered_total")


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _read_token(token: Optional[str], token_file: Optional[str]) -> Optional[bytes]:
    """The monitor's token: given, else from ``token_file``, else from the environment."""
    if token is None and token_file is not None:
        try:
            with open(token_file, encoding="utf-8") as fh:
                token = fh.read().strip()
        except OSError as exc:
            raise ValueError(f"cannot read the monitor token file {token_file!r}: "
                             f"{exc.strerror or exc}") from None
        if token == "":
            raise ValueError(f"the monitor token file {token_file!r} is empty")
    if token is None:
        token = os.environ.get(MONITOR_TOKEN_ENV) or None
    if token is None:
        return None
    if not isinstance(token, str) or not token.strip():
        raise ValueError("the monitor token must be a non-empty string")
    return token.strip().encode("utf-8")


def _process_stats() -> Dict[str, float]:
    """CPU seconds, resident and virtual memory, start time and file descriptors."""
    times = os.times()
    out: Dict[str, float] = {"cpu_seconds": times[0] + times[1]}
    try:  # Linux: /proc tells the current RSS; elsewhere only the peak is known
        with open("/proc/self/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        page, ticks = os.sysconf("SC_PAGE_SIZE"), os.sysconf("SC_CLK_TCK")
        out["virtual_memory_bytes"] = float(fields[20])
        out["resident_memory_bytes"] = float(fields[21]) * page
        with open("/proc/stat", "rb") as fh:
            boot = next(float(line.split()[1]) for line in fh if line.startswith(b"btime"))
        out["start_time_seconds"] = boot + float(fields[19]) / ticks
        out["open_fds"] = float(len(os.listdir("/proc/self/fd")))
    except (OSError, ValueError, IndexError, StopIteration, AttributeError):
        pass
    try:
        import resource

        out["max_fds"] = float(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    except (ImportError, OSError, ValueError):  # pragma: no cover - Windows
        pass
    return out


def _fold(values: Dict[str, Any], cap: int,
          merge: Callable[[Any, Any], Any]) -> Tuple[Dict[str, Any], int]:
    """Keep the first ``cap`` keys (by sorted order); merge the rest into ``__other__``.

    Returns the folded dict and how many keys were folded.
    """
    if len(values) <= cap:
        return values, 0
    kept: Dict[str, Any] = {}
    other: Any = None
    folded = 0
    for key in sorted(values):
        if len(kept) < cap - 1 and key != _OTHER:
            kept[key] = values[key]
        else:
            other = values[key] if other is None else merge(other, values[key])
            folded += 1
    kept[_OTHER] = other
    return kept, folded


def _merge_numbers(a: Any, b: Any) -> Any:
    """Add two counters, dicts of counters or histogram bucket lists (ages: the larger)."""
    if isinstance(a, dict) or isinstance(b, dict):
        a, b = (a if isinstance(a, dict) else {}), (b if isinstance(b, dict) else {})
        return {k: (max(a.get(k) or 0, b.get(k) or 0) if k.endswith("_age_seconds")
                    else _merge_numbers(a.get(k), b.get(k))) for k in {**a, **b}}
    if isinstance(a, list) and isinstance(b, list):  # [[le, cumulative], ...]
        return [[x[0], x[1] + y[1]] for x, y in zip(a, b)]
    if a is None or b is None:
        return a if b is None else b
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool):
        return a + b
    return None


def _pattern_label(pattern: str) -> str:
    """A subscription pattern as a label value: request inboxes fold into one per prefix."""
    for prefix in INBOX_PREFIXES:
        if pattern.startswith(prefix):
            return prefix + "*"
    return pattern


def _iso(epoch: Optional[float]) -> Optional[str]:
    return None if epoch is None else _format_timestamp(epoch)


class _Watched:
    """The components a Monitor reports on, grouped by what they offer."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.transports: Dict[str, Any] = {}
        self.rpc: Dict[str, Any] = {}
        self.executors: Dict[str, Any] = {}
        self.queues: Dict[str, Any] = {}  # objects with monitor_snapshot()
        self.meters: Dict[str, Any] = {}
        self.checks: Dict[str, Callable[[], Any]] = {}
        self._seen: Dict[int, str] = {}

    def add(self, component: Any, name: Optional[str]) -> None:
        with self.lock:
            self._add(component, name)

    def _add(self, component: Any, name: Optional[str]) -> None:
        if id(component) in self._seen:
            return
        if isinstance(component, Transport):
            group, default = self.transports, _transport_name(component)
        elif isinstance(component, RPCServer):
            group, default = self.rpc, component.service_name
        elif isinstance(component, Executor):
            group, default = self.executors, f"executor-{len(self.executors) + 1}"
        elif callable(getattr(component, "monitor_snapshot", None)):
            group = self.queues
            default = f"{type(component).__name__.lower()}-{len(self.queues) + 1}"
        elif isinstance(component, (MessageQueue, RemoteQueue)):
            group, default = {}, ""  # only what it owns is shown
        elif hasattr(component, "stats"):
            group = self.meters
            default = getattr(component, "name", None) or type(component).__name__
        else:
            raise TypeError(f"Monitor cannot watch a {type(component).__name__}: it is not a "
                            "transport, queue, RPC server, executor, meter (stats) or an "
                            "object with monitor_snapshot()")
        key = str(name or default)
        base, n = key, 2
        while key in group:  # two components of one kind with the same name
            key, n = f"{base}-{n}", n + 1
        group[key] = component
        self._seen[id(component)] = key
        # What a component owns is watched too.
        for owned in (getattr(component, "transport", None), getattr(component, "queue", None),
                      getattr(component, "executor", None), getattr(component, "local", None)):
            if owned is not None and owned is not component and (
                    isinstance(owned, (Transport, MessageQueue, Executor))):
                self._add(owned, None)


def _transport_name(transport: Any) -> str:
    if isinstance(transport, TCPServerTransport):
        return f"tcp-server {transport.host}:{transport.port}"
    if isinstance(transport, TCPClientTransport):
        return f"tcp-client {transport.host}:{transport.port}"
    return type(transport).__name__


class _Snapshot:
    """One consistent-enough view of every watched component, taken per request."""

    def __init__(self, watched: _Watched, monitor: Monitor) -> None:
        with watched.lock:
            transports = dict(watched.transports)
            rpc = dict(watched.rpc)
            executors = dict(watched.executors)
            queues = dict(watched.queues)
            meters = dict(watched.meters)
            checks = dict(watched.checks)
        self.monitor = monitor
        self.now = time.time()
        self.transport_stats = {name: dict(t.stats) for name, t in transports.items()}
        self.servers = {n: t for n, t in transports.items() if isinstance(t, TCPServerTransport)}
        self.transports = transports
        self.rpc = rpc
        self.executors = executors
        self.queue_sources = queues
        self.meter_sources = meters
        self.checks = checks
        self.process = _process_stats()

    # -- totals ------------------------------------------------------------------

    def _sum(self, key: str, kinds: Tuple[type, ...] = (Transport,)) -> int:
        return sum(int(stats.get(key, 0) or 0) for name, stats in self.transport_stats.items()
                   if isinstance(self.transports[name], kinds))

    def totals(self) -> Dict[str, int]:
        memory = (MemoryTransport,)
        return {
            "connections": self._sum("connections"),
            "total_connections": self._sum("accepted"),
            "in_msgs": self._sum("messages_in"),
            "out_msgs": self._sum("messages_out") + self._sum("sent", memory),
            "in_bytes": self._sum("bytes_in"),
            "out_bytes": self._sum("bytes_out"),
            "slow_consumers": self._sum("slow_consumers"),
        }

    def failures(self, keys: Tuple[str, ...]) -> Dict[str, int]:
        return {key: self._sum(key) for key in keys}

    def dropped(self) -> Dict[str, int]:
        """Every loss or refusal counter, by reason (zeros included)."""
        out = self.failures(_CONNECTION_FAILURES + _IN_FAILURES + _OUT_FAILURES)
        out["rpc_reply_errors"] = sum(s.stats["reply_errors"] for s in self.rpc.values())
        return out

    def subscriptions(self) -> Dict[str, Dict[str, int]]:
        """Pattern -> {"local": n, "remote": m} over every watched transport."""
        counts: Dict[str, Dict[str, int]] = {}

        def bump(pattern: str, side: str, n: int = 1) -> None:
            entry = counts.setdefault(_pattern_label(pattern), {"local": 0, "remote": 0})
            entry[side] += n

        for transport in self.transports.values():
            local = getattr(transport, "_local", transport)  # built on a MemoryTransport?
            if isinstance(local, MemoryTransport):
                for pattern in local._subscription_patterns():
                    bump(pattern, "local")
            if isinstance(transport, TCPServerTransport):
                for pattern, n in transport.interest_counts().items():
                    bump(pattern, "remote", n)
        return counts

    # -- health ------------------------------------------------------------------

    def health(self) -> List[str]:
        """Reasons this process is unhealthy (empty when it is healthy)."""
        problems = []
        for name, transport in self.transports.items():
            if getattr(transport, "closed", False):
                problems.append(f"transport {name} is closed")
            elif isinstance(transport, TCPServerTransport) and transport.address is None:
                problems.append(f"transport {name} is not listening")
        for name, server in self.rpc.items():
            if not server.serving:
                problems.append(f"RPC server {name} is not serving")
        for name, check in self.checks.items():
            try:
                verdict = check()
            except Exception as exc:
                verdict = f"{type(exc).__name__}: {exc}"
            if verdict is not None and verdict is not True:
                problems.append(f"check {name} failed" + (
                    f": {verdict}" if isinstance(verdict, str) and verdict else ""))
        return problems

    # -- sections ------------------------------------------------------------------

    def varz(self) -> Dict[str, Any]:
        monitor = self.monitor
        out: Dict[str, Any] = {
            "server_id": monitor.server_id, "name": monitor.name, "version": __version__,
            "python": sys.version.split()[0], "pid": os.getpid(),
            "start": _iso(monitor.started_at), "now": _iso(self.now),
            "uptime_seconds": round(self.now - (monitor.started_at or self.now), 3),
        }
        out.update(self.totals())
        subs = self.subscriptions()
        out["subscriptions"] = sum(e["local"] + e["remote"] for e in subs.values())
        out["dropped"] = self.dropped()
        out["rss_bytes"] = self.process.get("resident_memory_bytes")
        out["cpu_seconds"] = round(self.process["cpu_seconds"], 3)
        out["components"] = {
            "transports": sorted(self.transports), "rpc": sorted(self.rpc),
            "executors": sorted(self.executors), "queues": sorted(self.queue_sources),
            "meters": sorted(self.meter_sources),
        }
        return out

    def connections(self, state: str) -> List[Dict[str, Any]]:
        conns: List[Dict[str, Any]] = []
        for name, server in self.servers.items():
            wanted = ((False,) if state == "open" else (True,) if state == "closed"
                      else (False, True))
            for closed in wanted:
                for info in server.connections(closed=closed):
                    info["server"] = name
                    info["state"] = "closed" if closed else "open"
                    conns.append(info)
        return conns

    def rpcz(self) -> Dict[str, Dict[str, Any]]:
        services: Dict[str, Dict[str, Any]] = {}
        for name, server in self.rpc.items():
            stats = server.stats
            executor = server.executor
            total = executor.max_workers if executor is not None else None
            in_flight = stats["in_flight"]
            methods = server.method_stats()
            for entry in methods.values():
                hist = entry["duration_seconds"]
                entry["p50_seconds"] = _histogram_quantile(0.5, hist)
                entry["p99_seconds"] = _histogram_quantile(0.99, hist)
            services[name] = {
                "serving": server.serving, "requests": stats["requests"],
                "outcomes": {k: stats[k] for k in ("succeeded", "failed", "not_found",
                                                   "invalid", "reply_errors")},
                "in_flight": in_flight,
                # A pool takes calls in arrival order: min() is how many run.
                "workers": {"total": total,
                            "busy": min(in_flight, total) if total else in_flight,
                            "mode": executor.mode.value if executor is not None else "inline"},
                "methods": methods,
            }
        return services

    def queues(self) -> Dict[str, Dict[str, Any]]:
        out: Dict[str, Dict[str, Any]] = {}
        for source_name, source in self.queue_sources.items():
            try:
                snapshot = source.monitor_snapshot()
            except Exception as exc:
                logger.warning("monitor: %s.monitor_snapshot() failed: %s", source_name, exc)
                continue
            if "ready" in snapshot:  # one queue: shown under its watched name
                snapshot = {source_name: snapshot}
                prefix = ""
            else:
                prefix = "" if len(self.queue_sources) == 1 else f"{source_name}/"
            for queue_name, counters in sorted(snapshot.items()):
                row: Dict[str, Any] = {key: counters.get(key, 0) for key in
                                       _QUEUE_GAUGES + _QUEUE_TOTALS}
                for extra in ("wait_seconds", "topics"):
                    if counters.get(extra):
                        row[extra] = counters[extra]
                out[prefix + queue_name] = row
        return out

    def meters(self) -> Dict[str, Dict[str, Any]]:
        out = {}
        for name, meter in self.meter_sources.items():
            try:
                stats = meter.stats
            except Exception as exc:
                stats = {"error": f"{type(exc).__name__}: {exc}"}
            out[name] = dict(stats) if isinstance(stats, dict) else {"value": stats}
        return out


def _histogram_quantile(q: float, histogram: Dict[str, Any]) -> Optional[float]:
    """Estimate quantile ``q`` (0..1) of a histogram snapshot, like PromQL's function.

    Interpolates linearly inside the bucket holding the rank; None when empty.
    A rank in the +Inf bucket gives the largest finite bound.
    """
    count = histogram["count"]
    if not count:
        return None
    rank = q * count
    lower, below = 0.0, 0
    for bound, cumulative in histogram["buckets"]:
        if cumulative >= rank:
            if bound == "+Inf":
                return lower
            inside = cumulative - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = bound, cumulative
    return lower


def _metric_number(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    value = float(value)
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def _label_text(labels: Dict[str, Any]) -> str:
    if not labels:
        return ""
    parts = []
    for key, value in labels.items():
        text = str(value).replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n")
        parts.append(f'{key}="{text}"')
    return "{" + ",".join(parts) + "}"


class _MetricsWriter:
    """Writes metric families as Prometheus text 0.0.4 or OpenMetrics 1.0.0.

    The two differ only in framing: OpenMetrics names a counter's family
    without ``_total``, has ``info`` and ``# UNIT`` lines, and ends with
    ``# EOF``; the samples are the same.
    """

    def __init__(self, openmetrics: bool) -> None:
        self.openmetrics = openmetrics
        self.lines: List[str] = []

    def _head(self, family: str, kind: str, help_text: str, unit: Optional[str]) -> None:
        self.lines.append(f"# HELP {family} {help_text}")
        self.lines.append(f"# TYPE {family} {kind}")
        if unit and self.openmetrics:
            self.lines.append(f"# UNIT {family} {unit}")

    def counter(self, name: str, help_text: str, samples: List[Tuple[Dict[str, Any], Any]],
                unit: Optional[str] = None) -> None:
        """``name`` without ``_total``; every sample gets the suffix."""
        if not samples:
            return
        self._head(name if self.openmetrics else name + "_total", "counter", help_text, unit)
        for labels, value in samples:
            self.lines.append(f"{name}_total{_label_text(labels)} {_metric_number(value)}")

    def gauge(self, name: str, help_text: str, samples: List[Tuple[Dict[str, Any], Any]],
              unit: Optional[str] = None) -> None:
        samples = [(labels, value) for labels, value in samples if value is not None]
        if not samples:
            return
        self._head(name, "gauge", help_text, unit)
        for labels, value in samples:
            self.lines.append(f"{name}{_label_text(labels)} {_metric_number(value)}")

    def info(self, name: str, help_text: str, labels: Dict[str, Any]) -> None:
        """An info metric (a gauge named ``<name>_info`` in the 0.0.4 text)."""
        if self.openmetrics:
            self._head(name, "info", help_text, None)
        else:
            self._head(name + "_info", "gauge", help_text, None)
        self.lines.append(f"{name}_info{_label_text(labels)} 1")

    def histogram(self, name: str, help_text: str,
                  samples: List[Tuple[Dict[str, Any], Dict[str, Any]]], unit: str) -> None:
        """Each sample is a :meth:`_Histogram.snapshot` (cumulative buckets, +Inf last)."""
        if not samples:
            return
        self._head(name, "histogram", help_text, unit)
        for labels, hist in samples:
            for bound, cumulative in hist["buckets"]:
                le = bound if bound == "+Inf" else _metric_number(float(bound))
                self.lines.append(
                    f"{name}_bucket{_label_text(dict(labels, le=le))} {cumulative}")
            self.lines.append(f"{name}_count{_label_text(labels)} {hist['count']}")
            self.lines.append(f"{name}_sum{_label_text(labels)} {_metric_number(hist['sum'])}")

    def text(self) -> str:
        if self.openmetrics:
            self.lines.append("# EOF")
        return "\n".join(self.lines) + "\n"


def _render_metrics(snap: _Snapshot, openmetrics: bool, cap: int) -> str:
    """Every watched component as metric families (see docs/monitor.md for the list)."""
    import platform

    w = _MetricsWriter(openmetrics)
    folded: Dict[str, int] = {}

    def capped(family: str, values: Dict[str, Any]) -> Dict[str, Any]:
        kept, n = _fold(values, cap, _merge_numbers)
        folded[family] = n
        return kept

    w.info("eventforge_build", "Version of eventforge and of Python in this process.",
           {"version": __version__, "python": platform.python_version()})
    w.gauge("eventforge_healthy", "1 while /healthz answers 200, else 0.",
            [({}, 0 if snap.health() else 1)])
    proc = snap.process
    w.counter("process_cpu_seconds", "Total user and system CPU time spent in seconds.",
              [({}, proc["cpu_seconds"])], "seconds")
    for key, help_text, unit in (
        ("resident_memory_bytes", "Resident memory size in bytes.", "bytes"),
        ("virtual_memory_bytes", "Virtual memory size in bytes.", "bytes"),
        ("start_time_seconds", "Start time of the process since unix epoch in seconds.",
         "seconds"),
        ("open_fds", "Number of open file descriptors.", None),
        ("max_fds", "Maximum number of open file descriptors.", None),
    ):
        if key in proc:
            w.gauge("process_" + key, help_text, [({}, proc[key])], unit)
    totals = snap.totals()
    w.gauge("eventforge_connections_open", "Open TCP connections of watched servers.",
            [({}, totals["connections"])])
    w.counter("eventforge_connections", "TCP connections accepted.",
              [({}, totals["total_connections"])])
    w.counter("eventforge_connection_failures",
              "Connections refused or closed abnormally, by reason.",
              [({"reason": k}, v) for k, v in snap.failures(_CONNECTION_FAILURES).items()])
    w.counter("eventforge_messages_in", "Messages read from the network.",
              [({}, totals["in_msgs"])])
    w.counter("eventforge_messages_in_failures", "Incoming messages lost, by reason.",
              [({"reason": k}, v) for k, v in snap.failures(_IN_FAILURES).items()])
    w.counter("eventforge_messages_out",
              "Messages published locally plus messages routed to connections.",
              [({}, totals["out_msgs"])])
    w.counter("eventforge_messages_out_failures",
              "Outgoing messages lost or handlers that failed, by reason.",
              [({"reason": k}, v) for k, v in snap.failures(_OUT_FAILURES).items()])
    w.counter("eventforge_in_bytes", "Bytes read from the network.",
              [({}, totals["in_bytes"])], "bytes")
    w.counter("eventforge_out_bytes", "Bytes written to the network by watched servers.",
              [({}, totals["out_bytes"])], "bytes")
    subs = capped("eventforge_subscriptions", snap.subscriptions())
    w.gauge("eventforge_subscriptions",
            "Subscriptions by pattern; side is local (handlers) or remote (connections).",
            [({"pattern": p, "side": side}, counts[side])
             for p, counts in sorted(subs.items()) for side in ("local", "remote")])
    _render_rpc_metrics(w, snap.rpcz(), capped)
    _render_queue_metrics(w, snap.queues(), capped)
    meters = capped("eventforge_meter", snap.meters())
    w.gauge("eventforge_meter", "Numeric stats of watched meters.",
            [({"meter": name, "stat": stat}, value) for name, stats in sorted(meters.items())
             for stat, value in sorted(stats.items())
             if isinstance(value, (int, float)) and not isinstance(value, bool)][:cap * 8])
    w.gauge("eventforge_monitor_folded_label_values",
            f"Label values folded into {_OTHER} by the cap of {cap} per family.",
            [({"family": family}, n) for family, n in sorted(folded.items())])
    return w.text()


def _render_rpc_metrics(w: _MetricsWriter, services: Dict[str, Dict[str, Any]],
                        capped: Callable[[str, Dict[str, Any]], Dict[str, Any]]) -> None:
    w.counter("eventforge_rpc_requests", "RPC requests received, by service.",
              [({"service": s}, info["requests"]) for s, info in sorted(services.items())])
    w.counter("eventforge_rpc_request_failures",
              "RPC requests that did not succeed, by service and reason.",
              [({"service": s, "reason": reason}, info["outcomes"][reason])
               for s, info in sorted(services.items())
               for reason in ("failed", "not_found", "invalid", "reply_errors")])
    w.gauge("eventforge_rpc_workers", "Executor workers of an RPC service (inline: absent).",
            [({"service": s}, info["workers"]["total"]) for s, info in sorted(services.items())])
    w.gauge("eventforge_rpc_workers_busy", "Workers running a call (at most the total).",
            [({"service": s}, info["workers"]["busy"]) for s, info in sorted(services.items())])
    methods = capped("eventforge_rpc_calls", {
        f"{s}\x00{m}": entry for s, info in services.items()
        for m, entry in info["methods"].items()})
    rows = []
    for key, entry in sorted(methods.items()):
        service, _, method = key.partition("\x00")
        rows.append(({"service": service, "method": method or _OTHER}, entry))
    w.counter("eventforge_rpc_calls", "Calls of a registered method.",
              [(labels, e["calls"]) for labels, e in rows])
    w.counter("eventforge_rpc_call_failures", "Calls of a method that raised.",
              [(labels, e["error_total"]) for labels, e in rows])
    w.counter("eventforge_rpc_call_errors", "Calls of a method that raised, by error type.",
              [(dict(labels, kind=kind), n) for labels, e in rows
               for kind, n in sorted(e["errors"].items())])
    w.gauge("eventforge_rpc_in_flight", "Calls of a method started and not finished.",
            [(labels, e["in_flight"]) for labels, e in rows])
    w.histogram("eventforge_rpc_call_duration_seconds",
                "Time from a request's arrival to its outcome.",
                [(labels, e["duration_seconds"]) for labels, e in rows], "seconds")


def _render_queue_metrics(w: _MetricsWriter, queues: Dict[str, Dict[str, Any]],
                          capped: Callable[[str, Dict[str, Any]], Dict[str, Any]]) -> None:
    rows = sorted(capped("eventforge_queue", queues).items())
    helps = {
        "ready": "Jobs waiting for a consumer.", "in_flight": "Jobs handed out, not acked yet.",
        "delayed": "Jobs waiting for a retry delay.", "dead_letters": "Jobs in dead letters.",
        "oldest_ready_age_seconds": "Age of the oldest ready job.",
    }
    for key in _QUEUE_GAUGES:
        w.gauge(f"eventforge_queue_{key}", helps[key],
                [({"queue": q}, row[key]) for q, row in rows],
                "seconds" if key.endswith("_seconds") else None)
    for key, help_text in zip(_QUEUE_TOTALS, (
            "Jobs acknowledged.", "Jobs negatively acknowledged (failures).",
            "Jobs delivered again.", "Jobs moved to dead letters (failures).")):
        w.counter(f"eventforge_queue_{key[:-len('_total')]}", help_text,
                  [({"queue": q}, row[key]) for q, row in rows])
    w.histogram("eventforge_queue_wait_seconds", "Time jobs waited before a consumer took them.",
                [({"queue": q}, row["wait_seconds"]) for q, row in rows if "wait_seconds" in row],
                "seconds")


_PAGE_CSS = """\
body{font:14px/1.4 system-ui,sans-serif;margin:1em 2em;color:#222;background:#fafafa}
h1{font-size:1.3em;margin:.2em 0}h2{font-size:1.05em;margin:1.2em 0 .3em}
table{border-collapse:collapse;margin:.3em 0;background:#fff}
th,td{border:1px solid #ddd;padding:.2em .6em;text-align:right}th{text-align:left}
th:first-child,td:first-child{text-align:left}td.text{text-align:left}
.ok{color:#176f2c}.bad{color:#b00020;font-weight:bold}
td.alert{background:#fde2e1;color:#b00020;font-weight:bold}
.muted{color:#777}nav a{margin-right:1em}#controls[hidden]{display:none}
"""

# Optional polling: one request in flight at a time, the next one scheduled
# only after it finished; the pause button stops it.  Served as a file (the
# page's Content-Security-Policy forbids inline scripts).
_PAGE_JS = """\
(function () {
  "use strict";
  var controls = document.getElementById("controls");
  var button = document.getElementById("pause");
  var state = document.getElementById("poll-state");
  if (!controls || !button || !window.fetch || !window.DOMParser) { return; }
  var period = parseInt(controls.getAttribute("data-period"), 10) || 2000;
  var paused = false, inFlight = false, timer = null;
  controls.hidden = false;
  function schedule() {
    clearTimeout(timer);
    if (!paused) { timer = setTimeout(poll, period); }
  }
  function poll() {
    if (paused || inFlight) { return; }
    inFlight = true;
    fetch(location.pathname + location.search,
          {cache: "no-store", credentials: "same-origin", headers: {"Accept": "text/html"}})
      .then(function (response) {
        if (!response.ok) { throw new Error("HTTP " + response.status); }
        return response.text();
      })
      .then(function (text) {
        var fresh = new DOMParser().parseFromString(text, "text/html").getElementById("live");
        var live = document.getElementById("live");
        if (fresh && live) { live.replaceWith(document.importNode(fresh, true)); }
        state.textContent = "live";
      })
      .catch(function (error) { state.textContent = "update failed (" + error.message + ")"; })
      .then(function () { inFlight = false; schedule(); });
  }
  button.addEventListener("click", function () {
    paused = !paused;
    button.textContent = paused ? "Resume" : "Pause";
    state.textContent = paused ? "paused" : "live";
    if (paused) { clearTimeout(timer); } else { poll(); }
  });
  state.textContent = "live";
  schedule();
}());
"""

_PAGE_ROWS = 10  # connections on the page (the top ones by pending bytes)
_PAGE_TABLE_ROWS = 100  # RPC methods, queues and meters on the page


def _h(value: Any) -> str:
    import html

    return html.escape("" if value is None else str(value), quote=True)


def _seconds_text(value: Optional[float]) -> str:
    if value is None:
        return "\u2013"
    if value < 1:
        return f"{value * 1000:.2f} ms"
    return f"{value:.2f} s"


def _uptime_text(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    return (f"{days}d " if days else "") + f"{hours:02d}:{minutes:02d}:{secs:02d}"


def _table(headers: List[str], rows: List[List[str]], empty: str) -> str:
    """Rows are lists of ready HTML cells (``<td ...>...</td>``)."""
    if not rows:
        return f'<p class="muted">{_h(empty)}</p>'
    head = "".join(f"<th>{_h(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _td(value: Any, cls: str = "") -> str:
    return f'<td class="{cls}">{_h(value)}</td>' if cls else f"<td>{_h(value)}</td>"


def _render_page(monitor: Monitor, snap: _Snapshot, rates: Optional[Dict[str, float]]) -> str:
    """The page: server-rendered HTML, every name escaped, no external asset."""
    varz = snap.varz()
    problems = snap.health()
    health = ('<strong class="ok">ok</strong>' if not problems else
              '<strong class="bad">unhealthy</strong>: ' + _h("; ".join(problems)))
    if rates is None:
        rate_text = "rates appear from the second view on"
    else:
        rate_text = (f"in {rates['in_msgs']:.1f} msg/s ({rates['in_bytes']:.0f} B/s), "
                     f"out {rates['out_msgs']:.1f} msg/s ({rates['out_bytes']:.0f} B/s) "
                     f"over the last {rates['seconds']:.1f} s")
    parts = [
        f'<section id="summary"><p>health: {health}</p>',
        f"<p>id <code>{_h(varz['server_id'])}</code>, version {_h(varz['version'])}, "
        f"python {_h(varz['python'])}, pid {_h(varz['pid'])}, "
        f"up {_h(_uptime_text(varz['uptime_seconds']))} (since {_h(varz['start'])})</p>",
        f'<p>updated <time id="updated">{_h(varz["now"])}</time></p>',
        f'<p id="rates">{_h(rate_text)}</p>',
        f"<p>{_h(varz['connections'])} connections open ({_h(varz['total_connections'])} "
        f"accepted), {_h(varz['subscriptions'])} subscriptions, "
        f"{_h(varz['in_msgs'])} messages in, {_h(varz['out_msgs'])} out</p></section>",
    ]
    conns = sorted(snap.connections("open"), key=lambda c: -c["pending_bytes"])
    parts.append(f"<h2>Top connections by pending bytes ({len(conns)} open)</h2>")
    parts.append(_table(
        ["cid", "peer", "name", "pending bytes", "msgs in", "frames out", "bytes in",
         "bytes out", "subs", "idle"],
        [[_td(c["cid"]), _td(c["peer"], "text"), _td(c["name"] or "", "text"),
          _td(c["pending_bytes"]), _td(c["in_msgs"]), _td(c["out_frames"]), _td(c["in_bytes"]),
          _td(c["out_bytes"]), _td(c["subscriptions"]),
          _td(_seconds_text(max(0.0, snap.now - c["last_activity"])))]
         for c in conns[:_PAGE_ROWS]], "no open connections"))
    if len(conns) > _PAGE_ROWS:
        parts.append('<p><a href="/connz?sort=pending">all connections</a></p>')
    dropped = {k: v for k, v in varz["dropped"].items() if v}
    parts.append("<h2>Drops by reason</h2>")
    parts.append(_table(["reason", "count"],
                        [[_td(k), _td(v, "alert")] for k, v in sorted(dropped.items())],
                        "nothing dropped"))
    parts.append(_rpc_table(snap.rpcz()))
    parts.append(_queue_table(snap.queues()))
    meters = sorted(snap.meters().items())[:_PAGE_TABLE_ROWS]
    parts.append("<h2>Meters</h2>")
    parts.append(_table(["meter", "stats"], [
        [_td(name), _td(", ".join(f"{k}={v}" for k, v in sorted(stats.items())), "text")]
        for name, stats in meters], "no meters watched"))
    links = "".join(f'<a href="{path}">{path}</a>' for path in (
        "/healthz", "/varz", "/connz", "/subsz", "/rpcz", "/queuez", "/meterz", "/metrics"))
    title = _h(monitor.name)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>eventforge monitor: {title}</title>"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<link rel="icon" href="/favicon.ico">'
        '<link rel="stylesheet" href="/monitor.css">'
        '<script src="/monitor.js" defer></script></head><body>'
        f"<header><h1>eventforge monitor: {title}</h1>"
        f'<p id="controls" hidden data-period="{int(monitor.poll_interval * 1000)}">'
        '<button id="pause" type="button">Pause</button> '
        'auto-refresh: <span id="poll-state">off</span></p></header>'
        f'<main id="live">{"".join(parts)}</main>'
        f"<footer><h2>JSON and metrics</h2><nav>{links}</nav></footer></body></html>\n"
    )


def _rpc_table(services: Dict[str, Dict[str, Any]]) -> str:
    rows = []
    for service, info in sorted(services.items()):
        for method, entry in sorted(info["methods"].items()):
            errors = entry["error_total"]
            rows.append([_td(service), _td(method, "text"), _td(entry["calls"]),
                         _td(errors, "alert" if errors else ""), _td(entry["in_flight"]),
                         _td(_seconds_text(entry["p50_seconds"])),
                         _td(_seconds_text(entry["p99_seconds"]))])
    workers = "; ".join(
        f"{service}: {info['workers']['busy']} busy of "
        f"{info['workers']['total'] if info['workers']['total'] else 'inline'}"
        for service, info in sorted(services.items()))
    return ("<h2>RPC</h2>" + (f"<p>workers: {_h(workers)}</p>" if workers else "")
            + _table(["service", "method", "calls", "errors", "in flight", "p50", "p99"],
                     rows[:_PAGE_TABLE_ROWS], "no RPC server watched"))


def _queue_table(queues: Dict[str, Dict[str, Any]]) -> str:
    rows = []
    for name, q in sorted(queues.items())[:_PAGE_TABLE_ROWS]:
        dead = q["dead_letters"]
        rows.append([_td(name), _td(q["ready"]), _td(q["in_flight"]), _td(q["delayed"]),
                     _td(dead, "alert" if dead else ""),
                     _td(_seconds_text(q["oldest_ready_age_seconds"] or None)),
                     _td(q["acked_total"]), _td(q["nacked_total"]), _td(q["redelivered_total"]),
                     _td(q["dead_lettered_total"], "alert" if q["dead_lettered_total"] else "")])
    return "<h2>Queues</h2>" + _table(
        ["queue", "ready", "in flight", "delayed", "dead letters", "oldest ready",
         "acked", "nacked", "redelivered", "dead-lettered"], rows, "no work queue watched")


class _BadQuery(ValueError):
    """A query the endpoint cannot take (answered with 400)."""


def _parse_query(query: str, allowed: Tuple[str, ...]) -> Dict[str, str]:
    from urllib.parse import parse_qsl

    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query),
                          max_num_fields=_MAX_QUERY_FIELDS, errors="strict")
    except (ValueError, UnicodeDecodeError) as exc:
        raise _BadQuery(f"malformed query: {exc}") from None
    params: Dict[str, str] = {}
    for key, value in pairs:
        if key not in allowed:
            takes = ", ".join(allowed) if allowed else "no parameters"
            raise _BadQuery(f"unknown parameter {key[:40]!r}; this endpoint takes {takes}")
        if key in params:
            raise _BadQuery(f"parameter {key!r} is given twice")
        params[key] = value
    return params


def _int_param(params: Dict[str, str], key: str, default: int, highest: int) -> int:
    """A non-negative integer parameter, capped at ``highest`` (``limit`` at least 1)."""
    text = params.get(key)
    if text is None:
        return default
    if not re.fullmatch(r"[0-9]{1,18}", text):
        raise _BadQuery(f"{key} must be a non-negative integer, not {text[:40]!r}")
    value = min(int(text), highest)
    if key == "limit" and value < 1:
        raise _BadQuery("limit must be at least 1")
    return value


def _page_of(items: List[Any], params: Dict[str, str]) -> Dict[str, Any]:
    offset = _int_param(params, "offset", 0, _MAX_OFFSET)
    limit = _int_param(params, "limit", _PAGE_DEFAULT, _PAGE_MAX)
    return {"total": len(items), "offset": offset, "limit": limit,
            "items": items[offset:offset + limit]}


_HTTP_CLASSES: Optional[Tuple[Type[http.server.BaseHTTPRequestHandler], Any]] = None


def _http_classes() -> Tuple[Type[http.server.BaseHTTPRequestHandler], Any]:
    """The ``http.server`` subclasses behind :class:`Monitor`, built on first use."""
    global _HTTP_CLASSES
    if _HTTP_CLASSES is not None:
        return _HTTP_CLASSES
    import http.server
    import socket
    import socketserver

    class Handler(http.server.BaseHTTPRequestHandler):
        server_version = "eventforge-monitor"
        sys_version = ""
        protocol_version = "HTTP/1.0"  # one request per connection
        server: Any

        def setup(self) -> None:
            super().setup()
            self.connection.settimeout(self.server.monitor.request_timeout)

        def do_GET(self) -> None:  # noqa: N802 - the http.server naming
            self.server.monitor._serve(self, head=False)

        def do_HEAD(self) -> None:  # noqa: N802
            self.server.monitor._serve(self, head=True)

        def refuse_method(self) -> None:
            self.server.monitor._write(self, 405, {"error": f"method {self.command} not allowed; "
                                                   "the monitor is read-only (GET, HEAD)"},
                                       extra=(("Allow", "GET, HEAD"),))

        do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = refuse_method

        def send_error(self, code: int, message: Optional[str] = None,
                       explain: Optional[str] = None) -> None:
            # Malformed request lines and headers: JSON with our headers, and
            # without echoing the request (http.server's messages quote it).
            import http

            self.close_connection = True
            self.request_version = "HTTP/1.0"  # always send the status line and headers
            try:
                phrase = http.HTTPStatus(code).phrase
            except ValueError:
                phrase = "error"
            self.server.monitor._write(self, code, {"error": phrase})

        def log_message(self, format: str, *args: Any) -> None:
            logger.debug("monitor: %s %s", self.address_string(), format % args)

    class Server(http.server.HTTPServer):
        """One short-lived thread per request, at most ``_MONITOR_THREADS`` at once.

        Locks: ``workers_lock`` guards ``workers`` and is never held while
        taking anything else; ``slots`` is a semaphore taken without blocking.
        """

        daemon_threads = True

        def __init__(self, address: Tuple[str, int], monitor: Monitor) -> None:
            self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
            self.monitor = monitor
            self.slots = threading.BoundedSemaphore(_MONITOR_THREADS)
            self.workers: Dict[socket.socket, Tuple[threading.Thread, float]] = {}
            self.workers_lock = threading.Lock()
            self.names = itertools.count(1)
            super().__init__(address, Handler)

        def server_bind(self) -> None:  # HTTPServer's would do a reverse DNS lookup
            socketserver.TCPServer.server_bind(self)
            self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]

        def process_request(self, request: socket.socket,  # type: ignore[override]
                            client_address: Any) -> None:
            if not self.slots.acquire(blocking=False):
                try:
                    request.sendall(b"HTTP/1.0 503 Service Unavailable\r\nRetry-After: 1\r\n"
                                    b"Content-Length: 0\r\nConnection: close\r\n\r\n")
                except OSError:
                    pass
                self.shutdown_request(request)
                return
            worker = threading.Thread(target=self.work, args=(request, client_address),
                                      name=f"eventforge-monitor-request-{next(self.names)}",
                                      daemon=True)  # read-only: losing one at exit is safe
            with self.workers_lock:
                self.workers[request] = (worker, time.monotonic())
            worker.start()

        def work(self, request: socket.socket, client_address: Any) -> None:
            try:
                self.finish_request(request, client_address)
            except Exception:
                logger.debug("monitor: request from %s failed", client_address, exc_info=True)
            finally:
                self.shutdown_request(request)
                with self.workers_lock:
                    self.workers.pop(request, None)
                self.slots.release()

        def service_actions(self) -> None:
            # A client trickling bytes can renew each socket timeout; cut it
            # off after twice the timeout in total.
            self.cut_off(time.monotonic() - 2 * self.monitor.request_timeout)

        def cut_off(self, began_before: float) -> None:
            with self.workers_lock:
                late = [sock for sock, (_, began) in self.workers.items()
                        if began < began_before]
            for sock in late:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        def stop_workers(self, timeout: float) -> None:
            self.cut_off(float("inf"))  # requests still reading or writing end now
            deadline = time.monotonic() + timeout
            with self.workers_lock:
                workers = [w for w, _ in self.workers.values()]
            for worker in workers:
                if worker is not threading.current_thread():
                    worker.join(max(0.0, deadline - time.monotonic()))

    _HTTP_CLASSES = (Handler, Server)
    return _HTTP_CLASSES


class Monitor:
    """An opt-in HTTP monitoring endpoint: health, JSON, Prometheus metrics and a page.

    ``Monitor(host="127.0.0.1", port=8222)`` serves, once :meth:`start` ed,
    on its own thread (``port=0`` picks a free port; see :attr:`url`)::

        /healthz  /varz  /connz  /subsz  /rpcz  /queuez  /meterz  /metrics  /

    :meth:`watch` a transport, :class:`MessageQueue`, :class:`RPCServer`,
    :class:`Executor`, a meter (anything with ``stats``) or a work queue
    (anything with ``monitor_snapshot()``); what a component owns (a
    queue's transport, a server's queue and executor) is watched too.
    Each request reads snapshots that the components copy under their own
    locks: nothing is added to publishing, dispatch or framing.

    Security: bound to loopback by default.  Any other address needs a
    token (``token``, ``token_file`` or the ``EVENTFORGE_MONITOR_TOKEN``
    environment variable; a token given any of these ways is required on
    loopback too) unless ``allow_unauthenticated=True``.  Clients send it as
    ``Authorization: Bearer <token>`` (or as the password of HTTP Basic
    auth, for a browser); it is compared in constant time.  Requests whose
    ``Host`` is not loopback, the bound address or one of ``allowed_hosts``
    are refused (DNS rebinding).  Read-only: GET and HEAD only.  Payloads,
    RPC arguments and secrets are never shown.  Each socket read or write
    times out after ``request_timeout`` seconds (at most 60), at most four
    requests are served at once, lists are paged (``limit`` at most 1000)
    and metric label values are capped at ``max_label_values`` per family.

    Locks, outermost first: ``_lock`` (start/close, rate samples), the
    watched set's ``lock``, then each watched component's own (read by its
    ``stats``).  The HTTP server's ``workers_lock`` is taken alone.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = DEFAULT_MONITOR_PORT,
        *,
        components: Iterable[Any] = (),
        name: Optional[str] = None,
        token: Optional[str] = None,
        token_file: Optional[str] = None,
        allow_unauthenticated: bool = False,
        allowed_hosts: Iterable[str] = (),
        max_label_values: int = 100,
        request_timeout: float = _MONITOR_TIMEOUT,
        poll_interval: float = 2.0,
    ) -> None:
        if not isinstance(host, str) or not host:
            raise ValueError(f"host must be a non-empty string, not {host!r}")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"port must be an int in 0..65535, not {port!r}")
        if (isinstance(max_label_values, bool) or not isinstance(max_label_values, int)
                or max_label_values < 2):
            raise ValueError(f"max_label_values must be an int >= 2, not {max_label_values!r}")
        self._token = _read_token(token, token_file)
        if self._token is None and not _is_loopback(host) and not allow_unauthenticated:
            raise ValueError(
                f"a monitor bound to {host!r} (not loopback) needs a token: pass token_file=, "
                f"set {MONITOR_TOKEN_ENV}, or pass allow_unauthenticated=True")
        self.host = host
        self._port = port
        self.name = name or f"eventforge-{os.getpid()}"
        self.server_id = os.urandom(8).hex()
        self.max_label_values = max_label_values
        self.request_timeout = min(max(float(request_timeout), 0.1), 60.0)
        self.poll_interval = max(float(poll_interval), 0.5)
        if isinstance(allowed_hosts, str):
            allowed_hosts = [allowed_hosts]
        wildcard = host in ("0.0.0.0", "::", "")
        self._allowed_hosts = _LOOPBACK_NAMES | {h.lower().strip("[]") for h in allowed_hosts} | (
            set() if wildcard else {host.lower().strip("[]")})
        self._watched = _Watched()
        self._lock = threading.Lock()
        self._httpd: Any = None  # the HTTPServer subclass of _http_classes(), once started
        self._thread: Optional[threading.Thread] = None
        self._closed = False
        self.started_at: Optional[float] = None
        self._samples: Deque[Tuple[float, Dict[str, int]]] = collections.deque(maxlen=64)
        for component in components:
            self.watch(component)

    # -- what it reports on -----------------------------------------------------

    def watch(self, component: Any, name: Optional[str] = None) -> Any:
        """Report on ``component`` (and what it owns) under ``name``; returns it."""
        self._watched.add(component, name)
        return component

    def add_check(self, name: str, check: Callable[[], Any]) -> None:
        """Make /healthz call ``check()``: None or True is healthy, else the reason."""
        if not callable(check):
            raise TypeError("check must be callable")
        with self._watched.lock:
            self._watched.checks[str(name)] = check

    # -- lifecycle ----------------------------------------------------------------

    @property
    def address(self) -> Optional[Tuple[str, int]]:
        """The bound ``(host, port)`` once started, else None."""
        httpd = self._httpd
        return None if httpd is None else (self.host, httpd.server_address[1])

    @property
    def port(self) -> int:
        """The bound port once started (the configured one before)."""
        return self._httpd.server_address[1] if self._httpd is not None else self._port

    @property
    def requests_in_progress(self) -> int:
        """Requests being served right now, 0 when not serving (a debug hook)."""
        httpd = self._httpd
        if httpd is None:
            return 0
        with httpd.workers_lock:
            return len(httpd.workers)

    @property
    def url(self) -> str:
        """``http://host:port/`` of the page."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def start(self) -> Monitor:
        """Bind and serve on a background thread; returns self (idempotent)."""
        _, server_class = _http_classes()
        with self._lock:
            if self._closed:
                raise RuntimeError("Monitor is closed")
            if self._httpd is not None:
                return self
            try:
                httpd = server_class((self.host, self._port), self)
            except OSError as exc:
                raise OSError(exc.errno, f"monitor cannot listen on {self.host}:{self._port}: "
                                         f"{exc.strerror or exc}") from None
            self._httpd = httpd
            self.started_at = time.time()
            self._samples.append((time.monotonic(), _Snapshot(self._watched, self).totals()))
            self._thread = threading.Thread(
                target=httpd.serve_forever, kwargs={"poll_interval": 0.25},
                name=f"eventforge-monitor-{httpd.server_address[1]}", daemon=True)
            self._thread.start()
        logger.info("monitor serving on %s", self.url)
        return self

    def close(self) -> None:
        """Stop serving; requests still in progress are cut off (safe to call twice)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            httpd, thread = self._httpd, self._thread
        if httpd is None:
            return
        if thread is not None and thread is not threading.current_thread():
            httpd.shutdown()
            thread.join(5.0)
        httpd.server_close()
        httpd.stop_workers(5.0)

    stop = close

    def __enter__(self) -> Monitor:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("serving " + self.url if self._httpd else "idle")
        return f"<Monitor {self.name!r} {state}>"

    # -- the data behind each endpoint ---------------------------------------------

    def snapshot(self) -> _Snapshot:
        """Read every watched component once (what one request renders)."""
        return _Snapshot(self._watched, self)

    def healthz(self) -> Tuple[int, Dict[str, Any]]:
        """``(200, {"status": "ok"})`` or ``(503, {"status": "unavailable", "reason": ...})``."""
        problems = self.snapshot().health()
        if not problems:
            return 200, {"status": "ok"}
        return 503, {"status": "unavailable", "reason": "; ".join(problems)}

    def varz(self) -> Dict[str, Any]:
        """Identity, uptime, totals, drops by reason, memory and CPU (the /varz body)."""
        return self.snapshot().varz()

    def get(self, target: str, accept: str = "") -> Tuple[int, Any]:
        """Answer ``target`` (e.g. ``"/connz?sort=pending"``) as over HTTP: ``(status, body)``.

        The body is a dict for the JSON endpoints and a str for /metrics and
        the page; ``accept`` picks the metrics format.
        """
        status, body, _, _ = self._route(target, accept)
        return status, body

    def metrics(self, openmetrics: bool = False) -> str:
        """The /metrics text: Prometheus 0.0.4, or OpenMetrics 1.0.0."""
        return _render_metrics(self.snapshot(), openmetrics, self.max_label_values)

    def _connz(self, snap: _Snapshot, params: Dict[str, str]) -> Dict[str, Any]:
        state = params.get("state", "open")
        if state not in ("open", "closed", "any"):
            raise _BadQuery(f"state must be open, closed or any, not {state[:40]!r}")
        sort = params.get("sort", "cid")
        if sort not in _CONNZ_SORTS:
            raise _BadQuery(f"sort must be one of {', '.join(_CONNZ_SORTS)}, not {sort[:40]!r}")
        key, descending = _CONNZ_SORTS[sort]
        conns = snap.connections(state)
        conns.sort(key=lambda c: (c.get(key) or 0, c["cid"]), reverse=descending)
        page = _page_of(conns, params)
        for conn in page["items"]:
            conn["idle_seconds"] = round(
                (conn.get("stop") or snap.now) - conn["last_activity"], 3)
            for field in ("start", "last_activity", "stop"):
                if field in conn:
                    conn[field] = _iso(conn[field])
        return {"server_id": self.server_id, "now": _iso(snap.now), "state": state,
                "sort": sort, "total": page["total"], "offset": page["offset"],
                "limit": page["limit"], "connections": page["items"]}

    def _subsz(self, snap: _Snapshot, params: Dict[str, str]) -> Dict[str, Any]:
        counts = snap.subscriptions()
        test = params.get("test")
        if test is not None:
            try:
                validate_topic(test, allow_reserved=True)
            except TopicError as exc:
                raise _BadQuery(f"test must be a topic: {exc}") from None
            counts = {p: c for p, c in counts.items() if topic_matches(p, test)}
        rows: List[Dict[str, Any]] = [{"pattern": p, "local": c["local"], "remote": c["remote"]}
                for p, c in sorted(counts.items(), key=lambda pc: (
                    -(pc[1]["local"] + pc[1]["remote"]), pc[0]))]
        page = _page_of(rows, params)
        out: Dict[str, Any] = {"server_id": self.server_id, "now": _iso(snap.now),
                               "num_subscriptions": sum(r["local"] + r["remote"] for r in rows),
                               "num_patterns": page["total"], "offset": page["offset"],
                               "limit": page["limit"], "patterns": page["items"]}
        if test is not None:
            out["test"] = test
        return out

    def _paged_dict(self, snap: _Snapshot, items: Dict[str, Any], key: str,
                    params: Dict[str, str]) -> Dict[str, Any]:
        page = _page_of(sorted(items.items()), params)
        return {"server_id": self.server_id, "now": _iso(snap.now), "total": page["total"],
                "offset": page["offset"], "limit": page["limit"], key: dict(page["items"])}

    def _rates(self, totals: Dict[str, int]) -> Optional[Dict[str, float]]:
        """Per-second rates against the newest earlier sample at least 1 s old."""
        now = time.monotonic()
        with self._lock:
            older = [(t, s) for t, s in self._samples if now - t >= 1.0]
            self._samples.append((now, totals))
        if not older:
            return None
        then, before = older[-1]
        span = now - then
        rates = {k: max(0, totals[k] - before.get(k, 0)) / span
                 for k in ("in_msgs", "out_msgs", "in_bytes", "out_bytes")}
        rates["seconds"] = span
        return rates

    # -- HTTP ------------------------------------------------------------------------

    _ROUTES = {  # path -> query parameters it takes
        "/": (), "/healthz": (), "/varz": (), "/metrics": (),
        "/connz": ("sort", "offset", "limit", "state"),
        "/subsz": ("test", "offset", "limit"),
        "/rpcz": ("offset", "limit"), "/queuez": ("offset", "limit"),
        "/meterz": ("offset", "limit"),
        "/monitor.css": (), "/monitor.js": (), "/favicon.ico": (),
    }

    def _host_allowed(self, host_header: Optional[str]) -> bool:
        if not host_header:
            return False
        host = host_header.strip().lower()
        if host.startswith("["):  # [v6]:port
            host = host[1:].partition("]")[0]
        elif host.count(":") == 1:
            host = host.partition(":")[0]
        return host in self._allowed_hosts

    def _authorized(self, header: Optional[str]) -> bool:
        import hmac

        token = self._token
        if token is None:
            return True
        scheme, _, value = (header or "").strip().partition(" ")
        given = b""
        if scheme.lower() == "bearer":
            given = value.strip().encode("utf-8", "replace")
        elif scheme.lower() == "basic":
            import base64
            import binascii

            try:
                decoded = base64.b64decode(value.strip(), validate=True)
            except (binascii.Error, ValueError):
                decoded = b""
            given = decoded.partition(b":")[2]
        return hmac.compare_digest(given, token)

    def _serve(self, handler: http.server.BaseHTTPRequestHandler, head: bool) -> None:
        try:
            status, body, ctype, extra = self._respond(handler)
        except Exception:
            logger.exception("monitor: %s failed", handler.path[:200])
            status, body, ctype, extra = 500, {"error": "internal error (logged)"}, None, ()
        self._write(handler, status, body, ctype, extra, head)

    def _respond(self, handler: http.server.BaseHTTPRequestHandler
                 ) -> Tuple[int, Any, Optional[str], Tuple[Tuple[str, str], ...]]:
        if not self._host_allowed(handler.headers.get("Host")):
            return 403, {"error": "Host header not allowed (use the bound name or loopback)"}, \
                None, ()
        if not self._authorized(handler.headers.get("Authorization")):
            return 401, {"error": "a valid token is required"}, None, (
                ("WWW-Authenticate", 'Basic realm="eventforge monitor"'),
                ("WWW-Authenticate", 'Bearer realm="eventforge monitor"'))
        return self._route(handler.path, handler.headers.get("Accept") or "")

    def _route(self, target: str, accept: str
               ) -> Tuple[int, Any, Optional[str], Tuple[Tuple[str, str], ...]]:
        from urllib.parse import urlsplit

        if len(target) > _MAX_URL:
            return 414, {"error": f"URL longer than {_MAX_URL} characters"}, None, ()
        parts = urlsplit(target)
        allowed = self._ROUTES.get(parts.path)
        if allowed is None:
            return 404, {"error": "not found", "endpoints": sorted(
                p for p in self._ROUTES if not p.startswith(("/monitor.", "/fav")))}, None, ()
        try:
            params = _parse_query(parts.query, allowed)
            return self._endpoint(parts.path, params, accept)
        except _BadQuery as exc:
            return 400, {"error": str(exc)}, None, ()

    def _endpoint(self, path: str, params: Dict[str, str], accept: str
                  ) -> Tuple[int, Any, Optional[str], Tuple[Tuple[str, str], ...]]:
        if path == "/monitor.css":
            return 200, _PAGE_CSS, "text/css; charset=utf-8", ()
        if path == "/monitor.js":
            return 200, _PAGE_JS, "text/javascript; charset=utf-8", ()
        if path == "/favicon.ico":
            return 204, b"", None, ()
        snap = self.snapshot()
        if path == "/healthz":
            problems = snap.health()
            if problems:
                return 503, {"status": "unavailable", "reason": "; ".join(problems)}, None, ()
            return 200, {"status": "ok"}, None, ()
        if path == "/metrics":
            openmetrics = "application/openmetrics-text" in accept.lower()
            return 200, _render_metrics(snap, openmetrics, self.max_label_values), (
                _CT_OPENMETRICS if openmetrics else _CT_PROMETHEUS), ()
        if path == "/":
            return 200, _render_page(self, snap, self._rates(snap.totals())), _CT_HTML, ()
        if path == "/varz":
            return 200, snap.varz(), None, ()
        if path == "/connz":
            return 200, self._connz(snap, params), None, ()
        if path == "/subsz":
            return 200, self._subsz(snap, params), None, ()
        if path == "/rpcz":
            return 200, self._paged_dict(snap, snap.rpcz(), "services", params), None, ()
        if path == "/queuez":
            return 200, self._paged_dict(snap, snap.queues(), "queues", params), None, ()
        return 200, self._paged_dict(snap, snap.meters(), "meters", params), None, ()

    def _write(self, handler: http.server.BaseHTTPRequestHandler, status: int, body: Any,
               ctype: Optional[str] = None, extra: Tuple[Tuple[str, str], ...] = (),
               head: bool = False) -> None:
        if isinstance(body, str):
            data = body.encode("utf-8")
        elif isinstance(body, bytes):
            data = body
        else:
            data = (json.dumps(body, indent=2, default=str) + "\n").encode("utf-8")
            ctype = ctype or _CT_JSON
        try:
            handler.send_response(status)
            if status != 204:
                handler.send_header("Content-Type", ctype or _CT_JSON)
                handler.send_header("Content-Length", str(len(data)))
            for key, value in _MONITOR_HEADERS + tuple(extra):
                handler.send_header(key, value)
            handler.end_headers()
            if not head and status != 204:
                handler.wfile.write(data)
        except OSError as exc:  # the client went away or timed out
            logger.debug("monitor: could not answer %s: %s", handler.client_address, exc)


# ---------------------------------------------------------------------------
# 14. Command line: worker, call, pub, sub and main()
# ---------------------------------------------------------------------------


class _CLIError(Exception):
    """A command-line problem reported as one line on stderr (exit status ``code``)."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


#: Exit statuses of the command line.
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2

_INFINITY = float("inf")

#: Service name of a worker and of ``eventforge call`` when none is given.
DEFAULT_SERVICE = "rpc"


def _read_secret(path: Optional[str]) -> Optional[bytes]:
    if not path:
        return None
    try:
        with open(path, "rb") as f:
            secret = f.read().strip()
    except OSError as exc:
        raise _CLIError(f"cannot read --secret-file {path!r}: {exc.strerror or exc}") from None
    if not secret:
        raise _CLIError(f"--secret-file {path!r} is empty")
    return secret


def _check_tls_files(*options: Tuple[str, Optional[str]]) -> None:
    """Name the option and the path of a TLS file that cannot be read."""
    for option, path in options:
        if path and not os.path.isfile(path):
            reason = "is a directory" if os.path.isdir(path) else "no such file"
            raise _CLIError(f"cannot load TLS files: {option} {path!r}: {reason}")


def _load_tls(what: str, load: Callable[[], Any]) -> None:
    """Run one step of loading a TLS context; a failure names the options involved."""
    import ssl

    try:
        load()
    except (OSError, ssl.SSLError) as exc:
        detail = getattr(exc, "reason", None) or exc.strerror or exc
        raise _CLIError(f"cannot load TLS files: {what}: {detail}") from None


def _server_ssl_context(cert: Optional[str], key: Optional[str],
                        ca: Optional[str]) -> Optional[ssl.SSLContext]:
    """TLS for a listener: ``cert``/``key`` identify it; ``ca`` also requires client certs."""
    if not cert and not key:
        if ca:
            raise _CLIError("--tls-ca on a worker needs --tls-cert and --tls-key")
        return None
    if not (cert and key):
        raise _CLIError("--tls-cert and --tls-key go together")
    _check_tls_files(("--tls-cert", cert), ("--tls-key", key), ("--tls-ca", ca))
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_tls(f"--tls-cert {cert!r} with --tls-key {key!r}",
              lambda: context.load_cert_chain(cert, key))
    if ca:
        _load_tls(f"--tls-ca {ca!r}", lambda: context.load_verify_locations(ca))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _client_ssl_context(ca: Optional[str], cert: Optional[str],
                        key: Optional[str]) -> Optional[ssl.SSLContext]:
    """TLS for a connecting client: verify the server with ``ca``; optional client cert."""
    if not (ca or cert or key):
        return None
    if bool(cert) != bool(key):
        raise _CLIError("--tls-cert and --tls-key go together")
    _check_tls_files(("--tls-ca", ca), ("--tls-cert", cert), ("--tls-key", key))
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies certificate and host name
    if ca:
        _load_tls(f"--tls-ca {ca!r}", lambda: context.load_verify_locations(ca))
    else:
        context.load_default_certs()
    if cert:
        _load_tls(f"--tls-cert {cert!r} with --tls-key {key!r}",
                  lambda: context.load_cert_chain(cert, key))
    return context


def _load_handler_module(spec: str) -> Any:
    """Import the worker's module by name (``pkg.handlers``) or path (``handlers.py``)."""
    import importlib

    if spec.endswith(".py") or os.sep in spec or (os.altsep and os.altsep in spec):
        import importlib.util

        path = os.path.abspath(spec)
        if not os.path.isfile(path):
            raise _CLIError(f"cannot import {spec!r}: no such file")
        name = os.path.splitext(os.path.basename(path))[0]
        directory = os.path.dirname(path)
        if directory not in sys.path:
            sys.path.insert(0, directory)  # so PROCESS mode children find it by name
        try:
            module_spec = importlib.util.spec_from_file_location(name, path)
            assert module_spec is not None and module_spec.loader is not None
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            module_spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(name, None)
            raise _CLIError(f"cannot import {spec!r}: {type(exc).__name__}: {exc}") from None
        return module
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # as ``python -m`` does
    try:
        return importlib.import_module(spec)
    except Exception as exc:
        raise _CLIError(f"cannot import module {spec!r}: {type(exc).__name__}: {exc}") from None


def load_worker_module(spec: str) -> Tuple[Any, Dict[str, Callable[..., Any]], Optional[str]]:
    """Import a worker module and check its contract; return (module, handlers, service).

    The module must define a non-empty dict ``HANDLERS`` mapping method names
    (strings) to plain callables; it may define ``SERVICE_NAME`` (a string)
    and ``setup(queue)``, called once with the worker's MessageQueue before
    serving (to subscribe to topics or keep the queue for publishing).  A
    broken module raises ValueError with one line saying what is wrong.
    """
    try:
        module = _load_handler_module(spec)
        handlers = getattr(module, "HANDLERS", None)
        if handlers is None:
            raise _CLIError(f"module {spec!r} defines no HANDLERS dict "
                            "(expected HANDLERS = {'name': function, ...})")
        if not isinstance(handlers, dict):
            raise _CLIError(f"HANDLERS in {spec!r} must be a dict of name -> callable, "
                            f"not {type(handlers).__name__}")
        _check_handler_table(spec, "HANDLERS", handlers)
        service = getattr(module, "SERVICE_NAME", None)
        if service is not None and (not isinstance(service, str) or not service):
            raise _CLIError(f"SERVICE_NAME in {spec!r} must be a non-empty string, "
                            f"not {service!r}")
        setup = getattr(module, "setup", None)
        if setup is not None and not callable(setup):
            raise _CLIError(f"setup in {spec!r} must be a function taking the queue")
    except _CLIError as exc:
        raise ValueError(str(exc)) from None
    return module, dict(handlers), service


def _check_handler_table(spec: str, name: str, table: Dict[Any, Any]) -> None:
    """A worker module's table of handlers: non-empty, str keys, plain callables."""
    if not table:
        raise _CLIError(f"{name} in {spec!r} is empty: nothing to serve")
    for key, func in table.items():
        if not isinstance(key, str) or not key:
            raise _CLIError(f"{name} in {spec!r} has a key that is not a non-empty "
                            f"string: {key!r}")
        if not callable(func):
            raise _CLIError(f"{name}[{key!r}] in {spec!r} is not callable "
                            f"({type(func).__name__})")
        if _is_async_callable(func):
            raise _CLIError(f"{name}[{key!r}] in {spec!r} is a coroutine function; "
                            "workers serve plain functions")


def load_job_module(spec: str) -> Tuple[Any, Dict[str, Callable[[Message], Any]]]:
    """Import a queue worker's module; return (module, jobs).

    The module must define a non-empty dict ``JOBS`` mapping topics to
    handlers; each handler is called with a job (a :class:`Message`), acks it
    by returning and has it retried by raising.  A broken module raises
    ValueError with one line saying what is wrong.
    """
    try:
        module = _load_handler_module(spec)
        jobs = getattr(module, "JOBS", None)
        if not isinstance(jobs, dict):
            raise _CLIError(f"module {spec!r} defines no JOBS dict (expected "
                            "JOBS = {'topic': handler, ...}, each handler taking a job)")
        _check_handler_table(spec, "JOBS", jobs)
        for topic in jobs:
            try:
                validate_topic(topic)
            except TopicError as exc:
                raise _CLIError(f"JOBS in {spec!r}: {exc}") from None
    except _CLIError as exc:
        raise ValueError(str(exc)) from None
    return module, dict(jobs)


def _format_address(address: Tuple[Any, ...]) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def _install_stop_signals(stop: threading.Event) -> Callable[[], None]:
    """Make SIGTERM (and SIGBREAK on Windows) set ``stop``; returns a restore function."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    import signal

    previous = {}

    def handler(signum: int, frame: Optional[types.FrameType]) -> None:
        stop.set()

    for name in ("SIGTERM", "SIGBREAK"):
        signum = getattr(signal, name, None)
        if signum is not None:
            try:
                previous[signum] = signal.signal(signum, handler)
            except (ValueError, OSError):  # pragma: no cover - exotic platforms
                pass

    def restore() -> None:
        for signum, old in previous.items():
            signal.signal(signum, old)

    return restore


def _wait_until(stop: threading.Event) -> None:
    """Block until ``stop`` is set or Ctrl-C is pressed."""
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        stop.set()


def _configure_logging(level: str) -> None:
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise _CLIError(f"unknown --log-level {level!r} (use DEBUG, INFO, WARNING or ERROR)")
    logging.basicConfig(level=numeric, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(numeric)


def _count_of(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _stop_at_once(out: Callable[[str], Any], service: str, stats: Dict[str, Any],
                  why: str = "second Ctrl-C", status: int = 130) -> None:
    """A second Ctrl-C while draining (or a drain that timed out): say so and end now.

    The calls still running cannot be interrupted (threads cannot be killed,
    and the interpreter would wait for them at exit), so the process ends
    with ``os._exit``; their callers see the connection drop.
    """
    out(f"eventforge worker stopped at once ({why}): service '{service}', "
        f"{_count_of(stats['requests'], 'request')} served, "
        f"{stats['in_flight']} abandoned in flight")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _cmd_worker(args: argparse.Namespace, out: Callable[[str], Any]) -> int:
    _configure_logging(args.log_level)
    if args.workers < 1:
        raise _CLIError(f"--workers must be >= 1, not {args.workers}")
    if args.queue:
        return _cmd_queue_worker(args, out)
    try:
        module, handlers, module_service = load_worker_module(args.import_)
    except ValueError as exc:
        raise _CLIError(str(exc)) from None
    service = args.service or module_service or DEFAULT_SERVICE
    try:
        _request_topic(service)
    except ValueError as exc:
        raise _CLIError(str(exc)) from None
    secret = _read_secret(args.secret_file)
    context = _server_ssl_context(args.tls_cert, args.tls_key, args.tls_ca)
    monitor = _worker_monitor(args, service)

    broker = _broker_transport(args)
    listener: Optional[TCPServerTransport] = None
    try:
        if broker is None:
            listener = TCPServerTransport(args.host, args.port, secret=secret,
                                          ssl_context=context)
    except (ValueError, TypeError) as exc:
        raise _CLIError(str(exc)) from None
    transport: Transport = broker or listener  # type: ignore[assignment]
    stop = threading.Event()
    executor = Executor(ExecutionMode(args.mode), max_workers=args.workers)
    restore = _install_stop_signals(stop)
    try:
        queue = MessageQueue(transport)
        server = RPCServer(queue, executor=executor, service_name=service)
        for name, func in handlers.items():
            server.add_method(name, func)
        _answer_service_queries(queue, service, handlers)
        setup = getattr(module, "setup", None)
        if setup is not None:  # before listening: nothing is served until it succeeded
            try:
                setup(queue)
            except Exception as exc:
                raise _CLIError(f"setup(queue) of {args.import_!r} failed: "
                                f"{type(exc).__name__}: {exc}") from None
        try:
            if listener is not None:
                listener.start()
        except OSError as exc:
            cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc
            raise _CLIError(f"cannot listen on {_format_address((args.host, args.port))}: "
                            f"{cause.strerror or cause}", EXIT_FAILURE) from None
        executor.start()
        server.serve(blocking=False)
        _start_worker_monitor(monitor, server, None, out)
        where = args.nats or args.redis or _format_address(listener.address)  # type: ignore
        out(f"eventforge worker ready: service '{service}' on {where} "
            f"(methods: {', '.join(sorted(handlers))}; {args.workers} {args.mode} worker"
            f"{'s' if args.workers != 1 else ''}; pid {os.getpid()})")
        _wait_until(stop)
        try:
            logger.info("worker %s: stopping, finishing calls in flight "
                        "(Ctrl-C again stops at once)", service)
            server.stop(timeout=args.drain_timeout)
            if server.stats["in_flight"]:  # waiting on for them would hang the worker
                _stop_at_once(out, service, server.stats, status=EXIT_FAILURE,
                              why=f"calls still running after --drain-timeout "
                                  f"{args.drain_timeout:g} s")
            executor.stop(wait=True)
        except KeyboardInterrupt:
            _stop_at_once(out, service, server.stats)
        out(f"eventforge worker stopped: service '{service}', "
            f"{_count_of(server.stats['requests'], 'request')} served")
        return EXIT_OK
    finally:
        restore()
        if monitor is not None:
            monitor.close()
        executor.stop(wait=False)
        transport.close()


def _require_seconds(option: str, value: Optional[float]) -> None:
    """Refuse a duration that is not a finite number of seconds above zero."""
    if value is not None and not 0 < value < _INFINITY:  # NaN fails this too
        raise _CLIError(f"{option} must be a number of seconds above 0, not {value:g}")


def _broker_transport(args: argparse.Namespace) -> Optional[Transport]:
    """The NatsTransport/RedisTransport asked for by ``--nats``/``--redis``, else None."""
    url = getattr(args, "nats", None) or getattr(args, "redis", None)
    if not url:
        return None
    if any(getattr(args, name, None) for name in ("secret_file", "tls_cert", "tls_key", "tls_ca")):
        raise _CLIError("--secret-file and --tls-* secure the TCP listener; with --nats or "
                        "--redis put credentials and TLS in the broker URL instead")
    kind = "nats" if getattr(args, "nats", None) else "redis"
    try:
        if kind == "nats":
            from eventforge_ext.nats import NatsTransport

            return NatsTransport(url)
        from eventforge_ext.redis import RedisTransport

        return RedisTransport(url=url)
    except ImportError as exc:
        raise _CLIError(str(exc)) from None
    except EventforgeError as exc:  # the message names the broker and the reason
        raise _CLIError(str(exc), EXIT_FAILURE) from None
    except OSError as exc:
        raise _CLIError(f"cannot connect to {url}: {exc}", EXIT_FAILURE) from None


def _worker_monitor(args: argparse.Namespace, service: str) -> Optional[Monitor]:
    """The Monitor asked for by ``--monitor HOST:PORT`` (not started yet), or None."""
    if not args.monitor:
        return None
    match = re.fullmatch(r"\[?([^\[\]]*?)\]?:([0-9]{1,5})", args.monitor.strip())
    if match is None or not match.group(1):
        raise _CLIError(f"--monitor takes HOST:PORT (e.g. 127.0.0.1:8222), not {args.monitor!r}")
    host = match.group(1)
    if (args.monitor_token_file is None and not os.environ.get(MONITOR_TOKEN_ENV)
            and not _is_loopback(host)):
        raise _CLIError(f"--monitor {args.monitor}: a monitor bound to {host!r} (not loopback) "
                        f"needs a token: pass --monitor-token-file F or set {MONITOR_TOKEN_ENV}")
    try:
        return Monitor(host, int(match.group(2)), name=f"worker {service}",
                       token_file=args.monitor_token_file,
                       allowed_hosts=args.monitor_allowed_host)
    except ValueError as exc:
        raise _CLIError(f"--monitor: {exc}") from None


def _start_worker_monitor(monitor: Optional[Monitor], component: Any, name: Optional[str],
                          out: Callable[[str], Any]) -> None:
    """Watch what the worker serves, start the monitor and print its URL (if asked for)."""
    if monitor is None:
        return
    monitor.watch(component, name)
    try:
        monitor.start()
    except OSError as exc:  # strerror says where it cannot listen, without "[Errno 98]"
        raise _CLIError(exc.strerror or str(exc), EXIT_FAILURE) from None
    out(f"eventforge worker monitor: {monitor.url}")


def _cmd_queue_worker(args: argparse.Namespace, out: Callable[[str], Any]) -> int:
    """``worker --queue``: consume a durable work queue with the module's JOBS."""
    try:
        _, jobs = load_job_module(args.import_)
    except ValueError as exc:
        raise _CLIError(str(exc)) from None
    monitor = _worker_monitor(args, "jobs")
    stop = threading.Event()
    restore = _install_stop_signals(stop)
    try:
        try:
            queue = WorkQueue(store=args.queue, max_workers=args.workers * len(jobs),
                              default_visibility_timeout=args.visibility_timeout,
                              max_retries=args.max_retries)
        except (ImportError, StoreError, OSError, ValueError, TypeError) as exc:
            raise _CLIError(f"cannot open the work queue {args.queue!r}: {exc}") from None
        try:
            for topic, handler in jobs.items():
                queue.consume(topic, handler, consumer_group=args.group,
                              concurrency=args.workers)
            _start_worker_monitor(monitor, queue, "jobs", out)
            out(f"eventforge worker ready: jobs of {', '.join(sorted(jobs))} from {args.queue} "
                f"({args.workers} at a time per topic; pid {os.getpid()})")
            _wait_until(stop)
            logger.info("worker: stopping, finishing the jobs in hand")
        finally:
            # Running jobs finish and are acked; claimed ones not started go back.
            queue.close(timeout=args.drain_timeout)
        out(f"eventforge worker stopped: {queue.stats['work']['acked']} jobs done")
        return EXIT_OK
    finally:
        restore()
        if monitor is not None:
            monitor.close()


def _connect_queue(args: argparse.Namespace) -> MessageQueue:
    _require_seconds("--connect-timeout", args.connect_timeout)
    secret = _read_secret(args.secret_file)
    context = _client_ssl_context(args.tls_ca, args.tls_cert, args.tls_key)
    transport = TCPClientTransport(args.host, args.port, secret=secret, ssl_context=context)
    try:
        transport.connect(timeout=args.connect_timeout)
    except (OSError, EventforgeError) as exc:
        transport.close()
        raise _CLIError(_connect_failure(args, exc), EXIT_FAILURE) from None
    return MessageQueue(transport)


def _connect_failure(args: argparse.Namespace, exc: BaseException) -> str:
    """One line on why connecting failed, naming the address once and CLI options."""
    address = _format_address((args.host, args.port))
    detail = str(getattr(exc, "strerror", None) or exc)
    if isinstance(exc, AuthenticationError) and not args.secret_file:
        detail = re.sub(r"\s*\(pass secret=\)", "", detail) + " (pass --secret-file FILE)"
    if detail.startswith(f"cannot connect to {address}"):
        return detail
    if address in detail:
        return f"cannot connect: {detail}"
    return f"cannot connect to {address}: {detail}"


def _json_arg(text: str, what: str = "value") -> Any:
    """A command-line value: JSON when it parses as JSON, else the plain string.

    NaN, Infinity and numbers too large for a float (``1e400``) parse as JSON
    here but cannot be sent as JSON, so they are refused with one line.
    """

    def refuse(literal: str) -> Any:
        raise _CLIError(f"{what} {text!r}: {literal} is not a number JSON can carry "
                        "(NaN, Infinity and out-of-range numbers are refused)")

    def finite(literal: str) -> float:
        number = float(literal)
        return refuse(literal) if number in (_INFINITY, -_INFINITY) else number

    try:
        return json.loads(text, parse_constant=refuse, parse_float=finite)
    except ValueError:
        return text


def _to_json(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except ValueError:  # circular structures
        return repr(value)


#: Topic on which a worker answers "which services and methods do you serve?".
_SERVICES_TOPIC = "eventforge.services"


def _answer_service_queries(queue: MessageQueue, service: str, methods: Iterable[str]) -> None:
    """Make a worker reply ``{"services": {service: [methods]}}`` on :data:`_SERVICES_TOPIC`."""
    listing = {"services": {service: sorted(methods)}}

    def answer(message: Message) -> None:
        if message.reply_to:
            queue.reply(message, listing)

    queue.subscribe(_SERVICES_TOPIC, answer)


def _served_services(queue: MessageQueue, timeout: float) -> Optional[Dict[str, List[str]]]:
    """Ask the server what it serves; None when nobody answers (not a worker)."""
    try:
        reply = queue.request(_SERVICES_TOPIC, None, timeout=timeout)
    except EventforgeError:
        return None
    services = reply.payload.get("services") if reply and isinstance(reply.payload, dict) else None
    return services if isinstance(services, dict) else None


def _describe_services(services: Dict[str, Any]) -> str:
    return "; ".join(f"'{name}' ({', '.join(map(str, methods))})"
                     for name, methods in sorted(services.items()))


def _cmd_call(args: argparse.Namespace, out: Callable[[str], Any]) -> int:
    service = args.service or DEFAULT_SERVICE
    which = f"service {service!r}" + ("" if args.service else " (the default)")
    try:
        _request_topic(service)
    except ValueError as exc:
        raise _CLIError(f"--service: {exc}") from None
    if not args.method:
        raise _CLIError("METHOD must be a non-empty name")
    _require_seconds("--timeout", args.timeout)
    kwargs: Dict[str, Any] = {}
    if args.kwargs:
        kwargs = _json_arg(args.kwargs, "--kwargs")
        if not isinstance(kwargs, dict):
            raise _CLIError("--kwargs must be a JSON object")
    call_args = [_json_arg(a, "argument") for a in args.args]
    queue = _connect_queue(args)
    served: Dict[str, Any] = {}
    call_done = threading.Event()

    def not_served() -> Optional[str]:
        listing = served.get("services")
        if listing is None or service in listing:
            return None
        hint = f"--service {next(iter(listing))}" if len(listing) == 1 else "--service NAME"
        return (f"{which} is not served on {_format_address((args.host, args.port))}, "
                f"which serves {_describe_services(listing)}: pass {hint}")

    def check_service() -> None:
        # While the call is in flight, ask a worker what it serves, so that a
        # wrong --service fails at once, naming the right one, rather than
        # after --timeout.  A short grace lets a service the listing does not
        # know (set up by the module itself) answer anyway.
        grace = min(1.0, args.timeout)
        served["services"] = _served_services(queue, grace)
        if not_served() is not None and not call_done.wait(grace):
            queue.close()  # ends the waiting call below at once

    checker = threading.Thread(target=check_service, name="eventforge-cli-services",
                               daemon=True)
    client = RPCClient(queue, service_name=service, timeout=args.timeout)
    checker.start()
    try:
        try:
            result = client.invoke(args.method, call_args, kwargs)
        except (RemoteError, EventforgeTimeoutError, TransportError, SerializationError) as exc:
            call_done.set()
            checker.join(5.0)
            problem = not_served()
            if problem is not None and not isinstance(exc, RemoteError):
                raise _CLIError(problem, EXIT_FAILURE) from None
            if isinstance(exc, RemoteError):
                raise _CLIError(f"remote error: {exc}", EXIT_FAILURE) from None
            hint = ""
            if isinstance(exc, EventforgeTimeoutError) and not args.service:
                hint = (f" ({DEFAULT_SERVICE!r} is the default service; "
                        "pass --service NAME to call another)")
            raise _CLIError(f"{exc}{hint}", EXIT_FAILURE) from None
        finally:
            call_done.set()
        out(_to_json(result))
        return EXIT_OK
    finally:
        queue.close()
        checker.join(5.0)


def _cmd_pub(args: argparse.Namespace, out: Callable[[str], Any]) -> int:
    headers: Dict[str, Any] = {}
    for item in args.header or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise _CLIError(f"--header takes KEY=VALUE, not {item!r}")
        headers[key] = _json_arg(value, f"--header {key}")
    try:
        validate_topic(args.topic)
    except TopicError as exc:
        raise _CLIError(str(exc)) from None
    payload = None if args.payload is None else _json_arg(args.payload, "PAYLOAD")
    queue = _connect_queue(args)
    try:
        try:
            message_id = queue.publish(args.topic, payload, **headers)
        except (SerializationError, TransportError) as exc:
            raise _CLIError(str(exc), EXIT_FAILURE) from None
        out(message_id)
        return EXIT_OK
    finally:
        queue.close()


def _cmd_sub(args: argparse.Namespace, out: Callable[[str], Any]) -> int:
    try:
        validate_pattern(args.pattern)
    except TopicError as exc:
        raise _CLIError(str(exc)) from None
    if args.count is not None and args.count < 1:
        raise _CLIError("--count must be >= 1")
    _require_seconds("--timeout", args.timeout)
    stop = threading.Event()
    received = [0]
    lock = threading.Lock()
    queue = _connect_queue(args)
    where = _format_address((args.host, args.port))

    def connection_changed(connected: bool, detail: str) -> None:
        # One line when the server goes away, one when it is back (not one per retry).
        if connected:
            print(f"eventforge sub: connected to {where} again", file=sys.stderr, flush=True)
        else:
            print(f"eventforge sub: lost the connection to {where} ({detail}); reconnecting",
                  file=sys.stderr, flush=True)

    queue.transport.on_connection_change = connection_changed  # type: ignore[attr-defined]
    restore = _install_stop_signals(stop)
    try:
        def show(message: Message) -> None:
            with lock:
                if stop.is_set():
                    return
                out(_to_json({"topic": message.topic, "payload": message.payload,
                              "id": message.id, "headers": message.headers,
                              "timestamp": message.model_dump(mode="json").get("timestamp")}))
                received[0] += 1
                if args.count is not None and received[0] >= args.count:
                    stop.set()

        queue.subscribe(args.pattern, show)
        try:  # "listening" means it: the server has the subscription
            queue.transport.flush(10.0)  # type: ignore[attr-defined]
        except (OSError, EventforgeError):
            pass  # the connection-state lines say what goes on
        print(f"eventforge sub: listening to {args.pattern!r} on {where}",
              file=sys.stderr, flush=True)
        if args.timeout is not None:
            deadline = time.monotonic() + args.timeout
            try:
                while not stop.wait(min(0.5, max(0.0, deadline - time.monotonic()))):
                    if time.monotonic() >= deadline:
                        break
            except KeyboardInterrupt:
                pass
        else:
            _wait_until(stop)
        stop.set()
        return EXIT_OK
    finally:
        restore()
        queue.close()


#: Commands added by a later section (the demo): name -> run(args, out), and the
#: functions adding their parsers (listed before this section's commands).
_LATER_COMMANDS: Dict[str, Callable[[argparse.Namespace, Callable[[str], Any]], int]] = {}
_LATER_PARSERS: List[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]] = []


def _add_connection_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="server address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=9090, help="server port (default 9090)")
    parser.add_argument("--secret-file", metavar="F", help="file holding the shared secret")
    parser.add_argument("--tls-ca", metavar="F", help="CA file to verify the server (enables TLS)")
    parser.add_argument("--tls-cert", metavar="F", help="client certificate (mutual TLS)")
    parser.add_argument("--tls-key", metavar="F", help="client private key (mutual TLS)")
    parser.add_argument("--connect-timeout", type=float, default=10.0, metavar="S",
                        help="seconds to wait for the connection (default 10)")


def _build_parser() -> argparse.ArgumentParser:
    import argparse

    parser = argparse.ArgumentParser(
        prog="eventforge",
        description="Message-driven task execution: pub-sub, request-reply, RPC.",
    )
    parser.add_argument("--version", action="version", version=f"eventforge {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    for add_commands in _LATER_PARSERS:  # the demo's commands come first
        add_commands(commands)

    worker = commands.add_parser(
        "worker", help="serve a module's HANDLERS over TCP, or its JOBS from a work queue",
        description="Serve the HANDLERS of a module by RPC over TCP, or with --queue consume "
        "its JOBS from a durable work queue, until SIGTERM or Ctrl-C.")
    worker.add_argument("--import", dest="import_", required=True, metavar="MODULE",
                        help="module name or .py path defining HANDLERS = {name: callable} "
                        "(or, with --queue, JOBS = {topic: handler})")
    worker.add_argument("--queue", metavar="STORE",
                        help="consume jobs from this work queue: an SQLite file path "
                        "(or a redis:// URL) instead of serving RPC")
    worker.add_argument("--group", metavar="NAME",
                        help="with --queue: the consumer group (default: the default group)")
    worker.add_argument("--visibility-timeout", type=float, default=30.0, metavar="S",
                        help="with --queue: seconds a job stays leased (default 30)")
    worker.add_argument("--max-retries", type=int, default=3, metavar="N",
                        help="with --queue: redeliveries before dead-lettering (default 3)")
    worker.add_argument("--service", help="service name (default: the module's SERVICE_NAME, "
                        "else 'rpc')")
    worker.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1; 0.0.0.0 for all interfaces)")
    worker.add_argument("--port", type=int, default=9090, help="port (default 9090; 0 = any free)")
    worker.add_argument("--workers", type=int, default=4,
                        help="calls (with --queue: jobs per topic) run concurrently (default 4)")
    worker.add_argument("--mode", choices=("thread", "process"), default="thread",
                        help="run calls on threads or processes (default thread)")
    worker.add_argument("--secret-file", metavar="F", help="require this shared secret")
    worker.add_argument("--tls-cert", metavar="F", help="serve TLS with this certificate")
    worker.add_argument("--tls-key", metavar="F", help="private key of --tls-cert")
    worker.add_argument("--tls-ca", metavar="F", help="require client certificates from this CA")
    via = worker.add_mutually_exclusive_group()
    via.add_argument("--nats", metavar="URL", help="serve through this NATS server instead of "
                     "listening (workers share a service by queue group); needs eventforge[nats]")
    via.add_argument("--redis", metavar="URL", help="serve through this Redis server instead of "
                     "listening (one worker per service); needs eventforge[redis]")
    worker.add_argument("--drain-timeout", type=float, default=30.0, metavar="S",
                        help="on stop, seconds to let calls (or jobs) in flight finish "
                        "(default 30)")
    worker.add_argument("--log-level", default="INFO", metavar="L",
                        help="DEBUG, INFO, WARNING or ERROR (default INFO)")
    worker.add_argument("--monitor", metavar="HOST:PORT",
                        help="serve the monitor (health, JSON, /metrics, a page) there")
    worker.add_argument("--monitor-token-file", metavar="F",
                        help=f"require this token from monitor clients (or set "
                        f"{MONITOR_TOKEN_ENV}); needed unless HOST is loopback")
    worker.add_argument("--monitor-allowed-host", action="append", default=[], metavar="NAME",
                        help="also accept this Host name (e.g. the one Prometheus scrapes; "
                        "repeatable)")

    call = commands.add_parser("call", help="call a method on a running worker",
                               description="Call METHOD with ARGs (each parsed as JSON, else "
                               "taken as a string); print the result as JSON.")
    call.add_argument("method")
    call.add_argument("args", nargs="*", metavar="ARG")
    call.add_argument("--kwargs", metavar="JSON", help='keyword arguments, e.g. \'{"n": 3}\'')
    call.add_argument("--service", help=f"service name (default {DEFAULT_SERVICE!r})")
    call.add_argument("--timeout", type=float, default=10.0, metavar="S",
                      help="seconds to wait for the reply (default 10)")
    _add_connection_options(call)

    pub = commands.add_parser("pub", help="publish one message to a server")
    pub.add_argument("topic")
    pub.add_argument("payload", nargs="?", help="JSON payload (else taken as a string)")
    pub.add_argument("--header", action="append", metavar="KEY=VALUE", help="add a header")
    _add_connection_options(pub)

    sub = commands.add_parser("sub", help="print messages from a server as JSON lines")
    sub.add_argument("pattern", help="topic pattern; * is one segment, ** any number")
    sub.add_argument("--count", type=int, help="exit after this many messages")
    sub.add_argument("--timeout", type=float, metavar="S", help="exit after this many seconds")
    _add_connection_options(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run the ``eventforge`` command line; return the process exit status.

    Commands: ``demo``, ``demo-queue``, ``worker``, ``call``, ``pub``, ``sub`` (see
    ``eventforge COMMAND --help``).  Exit status 0 on success, 1 when the
    work failed (remote error, connection refused, timeout), 2 for bad usage
    or a bad handler module; problems are reported as one line on stderr.
    """
    parser = _build_parser()
    args = parser.parse_args(argv)

    def out(text: str) -> None:
        print(text, flush=True)

    command = args.command
    try:
        if command in _LATER_COMMANDS:
            return _LATER_COMMANDS[command](args, out)
        if command == "worker":
            return _cmd_worker(args, out)
        if command == "call":
            return _cmd_call(args, out)
        if command == "pub":
            return _cmd_pub(args, out)
        if command == "sub":
            return _cmd_sub(args, out)
    except _CLIError as exc:
        print(f"eventforge {command}: error: {exc}", file=sys.stderr, flush=True)
        return exc.code
    except KeyboardInterrupt:
        return 130
    parser.print_help()
    return EXIT_USAGE


def worker_main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``python -m eventforge.worker``: ``main(["worker", *argv])``."""
    return main(["worker", *(sys.argv[1:] if argv is None else argv)])


# ---------------------------------------------------------------------------
# 15. Demo: the ``demo`` and ``demo-queue`` commands
# ---------------------------------------------------------------------------
# Nothing in the library uses this section: its end adds the two commands to
# the command line (section 14).  Skip it on a first read.

_DEMO_HANDLERS_SOURCE = '''\
"""Handlers served by the demo's workers (``eventforge demo --print-handlers``).

Any module shaped like this one can be served with
``python -m eventforge worker --import MODULE``.
"""
import os

SERVICE_NAME = "demo"
WORKER = os.environ.get("EVENTFORGE_DEMO_WORKER", "pid-%d" % os.getpid())
_queue = None


def compute(n):
    """Some CPU work, tagged with who did it."""
    return {"worker": WORKER, "value": sum(i * i for i in range(n))}


def whoami():
    return WORKER


def setup(queue):
    """Called once by the worker: subscribe to jobs and announce results."""
    global _queue
    _queue = queue
    queue.subscribe("demo.jobs", _on_job)


def _on_job(message):
    _queue.publish("demo.events." + WORKER, {"job": message.payload, "done_by": WORKER})


HANDLERS = {"compute": compute, "whoami": whoami}
'''


_DEMO_JOBS_SOURCE = '''\
"""Jobs of the workers of ``eventforge demo-queue`` (written by the demo).

Any module shaped like this one can be run with
``python -m eventforge worker --import MODULE --queue jobs.db``.
"""
import os
import time

WORKER = os.environ.get("EVENTFORGE_DEMO_WORKER", "pid-%d" % os.getpid())


def render(job):
    print("%s: rendering %s (attempt %d)" % (WORKER, job.payload["name"],
                                              job.headers["_wq_attempt"]), flush=True)
    time.sleep(job.payload["seconds"])
    print("%s: finished %s" % (WORKER, job.payload["name"]), flush=True)


JOBS = {"demo.render": render}
'''


def _add_demo_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The parsers of ``demo`` and ``demo-queue`` (listed first in ``eventforge --help``)."""
    demo = commands.add_parser("demo", help="run the demo (no servers to install)",
                               description="In-process pub-sub and request-reply, then "
                               "workers in subprocesses called over TCP loopback.")
    demo.add_argument("--servers", type=int, default=3, help="worker processes (default 3)")
    demo.add_argument("--calls", type=int, default=300, help="RPC calls to make (default 300)")
    demo.add_argument("--in-process-only", action="store_true",
                      help="skip the part with subprocesses")
    demo.add_argument("--print-handlers", action="store_true",
                      help="print the workers' handler module (to run one by hand) and exit")
    demo.add_argument("--nats", metavar="URL", help="connect the workers through this NATS "
                      "server instead of TCP (needs eventforge[nats])")
    commands.add_parser("demo-queue", help="demo a durable work queue surviving a killed worker",
                        description="Two worker processes share an SQLite work queue: the "
                        "first is killed mid-job, the second finishes the job after its lease.")


def _cmd_demo(args: argparse.Namespace, out: Callable[[str], Any]) -> int:
    if args.print_handlers:
        out(_DEMO_HANDLERS_SOURCE.rstrip("\n"))
        return EXIT_OK
    if args.servers < 1 or args.calls < 1:
        raise _CLIError("--servers and --calls must be >= 1")
    if args.in_process_only:
        out("eventforge demo: pub-sub and request-reply inside this process. "
            "Nothing to install.")
    else:
        processes = f"{args.servers} worker process{'es' if args.servers != 1 else ''}"
        out(f"eventforge demo: pub-sub and request-reply inside this process, then across "
            f"{processes} it starts here and stops at the end "
            + (f"(through NATS at {args.nats})." if args.nats
               else "(TCP on 127.0.0.1). Nothing to install."))
    _demo_in_process(out)
    status = (EXIT_OK if args.in_process_only
              else _demo_cluster(out, args.servers, args.calls, nats=args.nats))
    if status == EXIT_OK:
        _demo_next_steps(out)
    return status


def _demo_in_process(out: Callable[[str], Any]) -> None:
    """Show in-process pub-sub, wildcards and request-reply on a MessageQueue."""
    with MessageQueue() as queue:
        out("== 1. pub-sub in this process: a publish reaches every matching subscriber ==")
        out("  subscribed to orders.created, orders.* (one more segment) "
            "and **.failed (any depth)")

        @queue.on("orders.created")
        def exact(message: Message) -> None:
            out(f"    orders.created   got {message.payload}")

        @queue.on("orders.*")
        def one_segment(message: Message) -> None:
            out(f"    orders.*         got {message.topic}")

        @queue.on("**.failed")
        def any_depth(message: Message) -> None:
            out(f"    **.failed        got {message.topic}")

        for topic, payload in (("orders.created", {"id": 1, "item": "book"}),
                               ("orders.payment.failed", {"id": 1})):
            out(f"  publish {topic}:")
            queue.publish(topic, payload)

        out("== 2. request-reply in this process: one question, one answer ==")

        @queue.on("math.add")
        def add(message: Message) -> None:
            queue.reply(message, message.payload["a"] + message.payload["b"])

        reply = queue.request("math.add", {"a": 10, "b": 20}, timeout=5.0)
        out(f"  math.add(10, 20) -> {reply.payload if reply else None}")
        rounds = 2000
        started = time.perf_counter()
        for i in range(rounds):
            queue.request("math.add", {"a": i, "b": 1}, timeout=5.0)
        elapsed = time.perf_counter() - started
        out(f"  {rounds} more requests, {elapsed / rounds * 1e6:.1f} us each")
        stats = queue.transport.stats
        out(f"  nothing left over: {stats['buffered']} unclaimed messages kept, "
            f"{stats['inboxes']} requests still waiting for a reply")


def _demo_cluster(out: Callable[[str], Any], servers: int = 3, calls: int = 300,
                  stream: Any = None, nats: Optional[str] = None) -> int:
    """Start ``servers`` workers as subprocesses and drive them over TCP loopback.

    With ``nats`` (a server URL) the workers and the demo meet on that NATS
    server instead: one client, calls balanced by the NATS queue group.
    """
    import argparse
    import shutil
    import tempfile

    out(f"== 3. {servers} worker process{'es' if servers != 1 else ''} on this machine, "
        f"serving 'demo' over {'NATS at ' + nats if nats else 'TCP on 127.0.0.1'} ==")
    directory = tempfile.mkdtemp(prefix="eventforge-demo-")
    processes: List[subprocess.Popen[str]] = []
    queues: List[MessageQueue] = []
    status = EXIT_OK
    try:
        names = [f"worker-{n + 1}" for n in range(servers)]
        addresses = _demo_start_workers(out, directory, names, nats, processes)
        if nats:  # one connection to the broker; it balances the calls
            queues.append(MessageQueue(_broker_transport(argparse.Namespace(nats=nats))))
            clients = [RPCClient(queues[0], service_name="demo", timeout=10)]
        else:
            for host, port in addresses:
                transport = TCPClientTransport(host, port)
                transport.connect(timeout=10)
                queues.append(MessageQueue(transport))
            clients = [RPCClient(q, service_name="demo", timeout=10) for q in queues]
        _demo_calls(out, RoundRobinRPCClient(clients), names, calls, nats,
                    sys.stdout if stream is None else stream)
        if not _demo_events(out, queues, clients, servers):
            status = EXIT_FAILURE
    finally:
        for q in queues:
            q.close()
        codes = [_stop_process(p) for p in processes]
        shutil.rmtree(directory, ignore_errors=True)
    if codes:
        clean = all(code == 0 for code in codes)
        out(f"== stopped {len(codes)} worker{'s' if len(codes) != 1 else ''}: "
            f"exit codes {codes} ({'clean' if clean else 'NOT clean'}) ==")
        if not clean:
            status = EXIT_FAILURE
    return status


def _demo_start_workers(out: Callable[[str], Any], directory: str, names: List[str],
                        nats: Optional[str], processes: List[subprocess.Popen[str]]
                        ) -> List[Tuple[str, int]]:
    """Part 3: start a worker per name (appended to ``processes``); their addresses."""
    handlers_path = os.path.join(directory, "demo_handlers.py")
    with open(handlers_path, "w", encoding="utf-8") as f:
        f.write(_DEMO_HANDLERS_SOURCE)
    started = time.perf_counter()
    listen = ("--nats", nats) if nats else ("--port", "0")
    processes.extend(_start_demo_worker(handlers_path, name, (*listen, "--workers", "2"),
                                        monitor=n == 0)
                     for n, name in enumerate(names))
    ready = [_await_ready(p, 30.0) for p in processes]
    for name, (address, _), process in zip(names, ready, processes):
        out(f"  {name}: pid {process.pid} serving 'demo' on {nats or _format_address(address)}")
    monitor_url = ready[0][1] if ready else None
    if monitor_url:
        out(f"  {names[0]} monitor (while the demo runs): {monitor_url}")
    out(f"  each started as `{_demo_launcher()} worker --import demo_handlers.py "
        f"{'--nats ' + nats if nats else '--port 0'}`, "
        f"all ready in {time.perf_counter() - started:.2f} s")
    return [address for address, _ in ready]


def _await_ready(process: subprocess.Popen[str],
                 timeout: float) -> Tuple[Tuple[str, int], Optional[str]]:
    """Wait for a worker's ready line: its (host, port) and the monitor URL it printed."""
    reader = _LineReader(process)
    monitor_url = None
    deadline = time.monotonic() + timeout
    while True:
        match = reader.search(r"monitor: (http://\S+)|"
                              r"ready: service '[^']*' on \[?([^\]\s]+?)\]?:(\d+) ",
                              deadline - time.monotonic())
        if match is None:
            process.kill()
            _, err = process.communicate(timeout=10)
            detail = (err or "").strip().splitlines()
            raise _CLIError("a demo worker did not start: "
                            + (detail[-1] if detail else f"no ready line within {timeout} s"),
                            EXIT_FAILURE)
        if match.group(1) is None:
            return (match.group(2), int(match.group(3))), monitor_url
        monitor_url = match.group(1)


def _demo_calls(out: Callable[[str], Any], pool: RoundRobinRPCClient, names: List[str],
                calls: int, nats: Optional[str], stream: Any) -> None:
    """Part 4: ``calls`` RPC calls spread over the workers; who served how many, how fast."""
    how = ("spread by the NATS queue group" if nats
           else "each to the next worker in turn (round-robin)")
    out(f"== 4. {calls} calls, {how} ==")
    progress = _Progress(calls, out, stream)
    per_worker: Dict[str, int] = {}
    latencies: List[float] = []
    for i in range(calls):
        t0 = time.perf_counter()
        answer = pool.compute(200 + i % 50)
        latencies.append(time.perf_counter() - t0)
        per_worker[answer["worker"]] = per_worker.get(answer["worker"], 0) + 1
        progress.update(i + 1)
    latencies.sort()
    for name in names:
        count = per_worker.get(name, 0)
        out(f"  {name}: {count:4d} calls  {'#' * (count * 30 // max(calls, 1))}")
    out(f"  time per call: median {_percentile(latencies, 50) * 1e3:.2f} ms, "
        f"90% within {_percentile(latencies, 90) * 1e3:.2f} ms, "
        f"99% within {_percentile(latencies, 99) * 1e3:.2f} ms, "
        f"slowest {latencies[-1] * 1e3:.2f} ms")

    try:
        pool.compute("ten")
    except RemoteError as exc:
        out(f"  an error in a worker comes back to the caller: "
            f"compute('ten') raised RemoteError({exc})")


def _demo_events(out: Callable[[str], Any], queues: List[MessageQueue],
                 clients: List[RPCClient], servers: int) -> bool:
    """Part 5: each worker answers a published job with an event; True if all came."""
    out("== 5. pub-sub across processes: each worker answers a job with an event ==")
    events: List[Message] = []
    got_all = threading.Event()
    lock = threading.Lock()

    def on_event(message: Message) -> None:
        with lock:
            events.append(message)
            if len(events) >= servers:
                got_all.set()

    for q in queues:
        q.subscribe("demo.events.*", on_event)
    # Interest travels to the servers asynchronously: make sure it arrived
    # before we publish (flush() on TCP; a call through a broker).
    for q, client in zip(queues, clients):
        if isinstance(q.transport, TCPClientTransport):
            q.transport.flush(10.0)
        else:
            client.whoami()
    for n, q in enumerate(queues):
        q.publish("demo.jobs", {"job": n + 1})
    if not got_all.wait(10.0):
        out(f"  only {len(events)} of {servers} events arrived")
        return False
    for message in sorted(events, key=lambda m: m.topic):
        out(f"  {message.topic:<22} got {message.payload}")
    return True


class _LineReader:
    """Collects a child process's stdout lines on a thread; waits for a pattern."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        import queue as queue_module

        self.lines: queue_module.Queue[Optional[str]] = queue_module.Queue()
        self._thread = threading.Thread(target=self._read, args=(process,), daemon=True,
                                        name="eventforge-demo-reader")
        self._thread.start()

    def _read(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None  # started with stdout=PIPE
        try:
            for line in process.stdout:
                self.lines.put(line.rstrip("\n"))
        except (OSError, ValueError):  # communicate() closed the pipe under us
            pass
        self.lines.put(None)

    def search(self, pattern: str, timeout: float) -> Optional[re.Match[str]]:
        """The match in the next line matching ``pattern``; None at the end or on timeout."""
        import queue as queue_module

        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue_module.Empty:
                return None
            if line is None:
                return None
            match = re.search(pattern, line)
            if match:
                return match

    def expect(self, pattern: str, timeout: float) -> str:
        """The next line matching ``pattern``; _CLIError if none comes in ``timeout`` s."""
        match = self.search(pattern, timeout)
        if match is None:
            raise _CLIError(f"the demo worker did not print {pattern!r} in time", EXIT_FAILURE)
        return match.string


def _demo_launcher() -> str:
    """How to start eventforge again the way this demo was started."""
    main_module = sys.modules.get("__main__")
    script = sys.argv[0] if sys.argv else ""
    if getattr(main_module, "__spec__", None) is None and \
            os.path.basename(script) == "eventforge.py":
        return f"python {script}"  # the vendored file, run as a script
    return "python -m eventforge"


def _demo_next_steps(out: Callable[[str], Any]) -> None:
    run = _demo_launcher()
    out("")
    out("Try it by hand next (the last two commands in two terminals):")
    out(f"  {run} demo --print-handlers > demo_handlers.py")
    out(f"  {run} worker --import demo_handlers.py   # serves 'demo' on 127.0.0.1:9090")
    out(f"  {run} call --service demo compute 1000   "
        '# prints {"worker": "pid-...", "value": 332833500}')
    out("README.md shows the same in Python code.")


def _demo_queue(out: Callable[[str], Any], lease: float = 1.0) -> int:
    """A durable work queue: a worker killed mid-job, the job finished by another."""
    import shutil
    import tempfile

    directory = tempfile.mkdtemp(prefix="eventforge-demo-queue-")
    path = os.path.join(directory, "jobs.db")
    jobs_file = os.path.join(directory, "demo_jobs.py")
    with open(jobs_file, "w", encoding="utf-8") as f:
        f.write(_DEMO_JOBS_SOURCE)
    options = ("--queue", path, "--workers", "1", "--visibility-timeout", str(lease))
    workers = []
    try:
        out(f"durable work queue: jobs in {path}, workers in separate processes")
        with WorkQueue(store=path) as queue:
            first = _start_demo_worker(jobs_file, "worker-1", options=options)
            workers.append(first)
            reader = _LineReader(first)
            reader.expect("ready", 30)
            queue.enqueue("demo.render", {"name": "report.pdf", "seconds": 0.5})
            out("  enqueued job 'report.pdf'")
            out("  " + reader.expect("rendering report.pdf", 30))
            first.kill()  # SIGKILL: no chance to ack or release the job
            first.wait(10)
            killed = time.monotonic()
            out(f"  killed worker-1 (pid {first.pid}) mid-job, without warning")
            second = _start_demo_worker(jobs_file, "worker-2", options=options)
            workers.append(second)
            reader = _LineReader(second)
            reader.expect("ready", 30)
            out(f"  started worker-2 (pid {second.pid})")
            line = reader.expect("rendering report.pdf", 30)
            out(f"  {line}, {time.monotonic() - killed:.1f} s after the kill: "
                f"the {lease:g} s lease of worker-1 ran out")
            out("  " + reader.expect("finished report.pdf", 30))
            if not _wait_for_empty(queue, 10.0):
                raise _CLIError("the job was not acknowledged in time", EXIT_FAILURE)
            counts = queue.store.counts()
            out(f"  queue: {counts['ready']} waiting, {counts['in_flight']} in flight, "
                f"{counts['dead']} dead letters")
        code = _stop_process(second)
        out(f"  worker-2 stopped (exit code {code}); the job was started twice and completed once")
        return EXIT_OK if code == 0 else EXIT_FAILURE
    finally:
        for process in workers:
            if process.poll() is None:
                process.kill()
                process.communicate(timeout=10)
            else:
                process.communicate(timeout=10)
        shutil.rmtree(directory, ignore_errors=True)


def _wait_for_empty(queue: WorkQueue, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while queue.pending_count() or queue.in_flight_count():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


class _Progress:
    """A plain-text progress display: one redrawn line on a TTY, a few lines otherwise."""

    def __init__(self, total: int, out: Callable[[str], Any], stream: Any) -> None:
        self.total = max(total, 1)
        self.out = out
        self.stream = stream
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self._next_mark = 25
        self._shown = -1

    def update(self, done: int) -> None:
        percent = done * 100 // self.total
        if self.tty:
            if percent == self._shown and done < self.total:
                return  # redraw once per percent
            self._shown = percent
            filled = done * 30 // self.total
            self.stream.write(f"\r  [{'#' * filled}{'.' * (30 - filled)}] {done}/{self.total}")
            if done >= self.total:
                self.stream.write("\n")
            self.stream.flush()
        elif percent >= self._next_mark:
            while self._next_mark <= percent:
                self._next_mark += 25
            self.out(f"  progress: {done}/{self.total} calls ({percent}%)")


def _percentile(sorted_values: List[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, max(0, int(round(q / 100 * (len(sorted_values) - 1)))))
    return sorted_values[index]


def _start_demo_worker(handlers_path: str, name: str,
                       options: Tuple[str, ...] = ("--port", "0", "--workers", "2"),
                       monitor: bool = False) -> subprocess.Popen[str]:
    import subprocess

    env = dict(os.environ)
    here = os.path.dirname(os.path.abspath(__file__))
    env["PYTHONPATH"] = here + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["EVENTFORGE_DEMO_WORKER"] = name
    env["PYTHONUNBUFFERED"] = "1"
    command = [sys.executable, "-m", "eventforge", "worker", "--import", handlers_path,
               *options, "--log-level", "WARNING"]
    if monitor:
        command += ["--monitor", "127.0.0.1:0"]
    # On Windows a new process group lets _stop_process send CTRL_BREAK_EVENT,
    # which the worker handles (SIGBREAK) like SIGTERM: a graceful stop.
    flags = getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0) if os.name == "nt" else 0
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True, creationflags=flags)


def _stop_process(process: subprocess.Popen[str], timeout: float = 10.0) -> Optional[int]:
    import subprocess

    if process.poll() is None:
        if os.name == "nt":
            import signal

            process.send_signal(signal.CTRL_BREAK_EVENT)  # type: ignore[attr-defined]
        else:
            process.terminate()  # SIGTERM: the worker finishes calls in flight, exits 0
    try:
        process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate(timeout=timeout)
    return process.returncode


_LATER_PARSERS.append(_add_demo_commands)
_LATER_COMMANDS.update({"demo": _cmd_demo, "demo-queue": lambda args, out: _demo_queue(out)})


# ---------------------------------------------------------------------------
# 16. Import aliases
# ---------------------------------------------------------------------------

# eventforge 0.1 shipped a package; these names keep its import paths working.
# Each entry maps an alias module to (target module, runnable entry point or
# None).  An entry point makes ``python -m ALIAS`` call ``target.entry()``.
_ALIASES: Dict[str, Tuple[str, Optional[str]]] = {
    "eventforge.types": ("eventforge", None),
    "eventforge.queue": ("eventforge", None),
    "eventforge.transports": ("eventforge", None),
    "eventforge.transports.base": ("eventforge", None),
    "eventforge.transports.memory": ("eventforge", None),
    "eventforge.transports.tcp": ("eventforge", None),
    "eventforge.transports.redis": ("eventforge_ext.redis", None),
    "eventforge.transports.nats": ("eventforge_ext.nats", None),
    "eventforge.integrations": ("eventforge_ext", None),
    "eventforge.integrations.logfire": ("eventforge_ext.logfire", None),
    "eventforge.remote": ("eventforge", None),
    "eventforge.executor": ("eventforge", None),
    "eventforge.rpc": ("eventforge", None),
    "eventforge.observers": ("eventforge", None),
    "eventforge.task": ("eventforge", None),
    "eventforge.work_queue": ("eventforge", None),
    "eventforge.worker": ("eventforge", "worker_main"),
}


_ModuleType = type(sys)


class _CallableAlias(_ModuleType):  # type: ignore[valid-type,misc]
    """An alias module that also stands for the function of the same name."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._eventforge_call(*args, **kwargs)


class _AliasLoader:
    """Creates a thin module that forwards attribute lookups to its target."""

    def __init__(self, target: str, entry: Optional[str]) -> None:
        self.target = target
        self.entry = entry

    def create_module(self, spec: Any) -> Any:
        return None  # the default module object is fine

    def exec_module(self, module: Any) -> None:
        import importlib

        target = importlib.import_module(self.target)
        module.__path__ = []  # lets ``eventforge.transports.tcp`` be imported below it
        module.__doc__ = f"Alias of {self.target!r} kept for the import paths of eventforge 0.1."
        leaf = module.__name__.rpartition(".")[2]
        shadowed = vars(target).get(leaf)
        if callable(shadowed) and not isinstance(shadowed, _ModuleType):
            # ``import eventforge.task`` rebinds ``eventforge.task`` (the
            # decorator) to this module: the module stays callable as the
            # decorator and ``from eventforge.task import task`` finds it.
            module.__class__ = _CallableAlias
            module._eventforge_call = module.__wrapped__ = shadowed
            module.__getattr__ = lambda name: shadowed if name == leaf else getattr(target, name)
        else:
            module.__getattr__ = lambda name: getattr(target, name)
        module.__dir__ = lambda: dir(target)
        module.__all__ = list(getattr(target, "__all__", ()))

    def get_code(self, fullname: str) -> Any:
        # runpy (``python -m eventforge.worker``) runs this code as __main__.
        if self.entry is None:
            raise ImportError(f"{fullname} is an import alias and cannot be run")
        source = f"import sys, {self.target} as _t\nsys.exit(_t.{self.entry}())\n"
        return compile(source, f"<{fullname}>", "exec")

    def is_package(self, fullname: str) -> bool:
        return False


class _AliasFinder:
    """Meta-path finder resolving the names in ``_ALIASES`` (cf. ``six.moves``)."""

    eventforge_alias_finder = True

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        found = _ALIASES.get(fullname)
        if found is None:
            return None
        import importlib.util

        loader = _AliasLoader(*found)
        return importlib.util.spec_from_loader(fullname, loader)  # type: ignore[arg-type]


# Make ``eventforge`` importable as a package root for the aliases above.
__path__: List[str] = []

if __name__ != "__main__" and not any(
    getattr(finder, "eventforge_alias_finder", False) for finder in sys.meta_path
):
    sys.meta_path.append(_AliasFinder())


if __name__ == "__main__":  # pragma: no cover - ``python -m eventforge``, ``python eventforge.py``
    # Hand over to the canonically imported module so that classes have one
    # identity (pickling in PROCESS mode and isinstance checks rely on it).
    # That module must be this very file: under ``python -I eventforge.py``
    # its directory is not on sys.path, and another eventforge may be.
    import importlib.util

    _here = os.path.abspath(__file__)
    _found = importlib.util.find_spec("eventforge")
    if _found is None or os.path.abspath(_found.origin or "") != _here:
        sys.path.insert(0, os.path.dirname(_here))
    import eventforge as _canonical

    sys.exit(_canonical.main())
