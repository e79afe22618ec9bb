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
    Any,
    Callable,
    Deque,
    Dict,
    List,
    Optional,
    Tuple,
    Type,
)

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
    # TCP
    "PROTOCOL_VERSION",
    "DEFAULT_TCP_PORT",
    "TCPServerTransport",
    "TCPClientTransport",
    # remote
    "RemoteQueue",
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

#: Longest accepted topic or pattern, in characters.  Generous for real
#: hierarchies, small enough that a hostile peer cannot make matching costly.
MAX_TOPIC_LENGTH = 1024

_SEGMENT_CHARS = r"[^\s\x00-\x1f\x7f-\x9f.*]+"
_TOPIC_RE = re.compile(rf"{_SEGMENT_CHARS}(?:\.{_SEGMENT_CHARS})*")
_PATTERN_SEGMENT_RE = re.compile(rf"{_SEGMENT_CHARS}|\*|\*\*")
_FORBIDDEN_CHAR_RE = re.compile(r"[\s\x00-\x1f\x7f-\x9f]")

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
    """Return True if the concrete ``topic`` matches the subscription ``pattern``."""
    if "*" not in pattern:
        return pattern == topic
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

    def match(self, topic: str) -> Tuple[Any, ...]:
        """Return the values whose pattern matches ``topic``, oldest first."""
        found = self._cache.get(topic)
        if found is not None:
            return found
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


def _parse_timestamp(value: Any) -> float:
    """Turn a wire timestamp (ISO 8601 string or epoch seconds) into epoch seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        # Years 1-9999 (what datetime can hold); also refuses NaN and infinities.
        if not -62135596800 <= value < 253402300800:
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
            return base + fraction - offset
    raise FrameError(
        f"timestamp must be an ISO 8601 string or epoch seconds, not {value!r:.80}"
    )


def _format_timestamp(epoch: float) -> str:
    """Format epoch seconds as ISO 8601 UTC with a ``Z`` suffix (microseconds)."""
    micros = int(round(epoch * 1_000_000))
    seconds, micro = divmod(micros, 1_000_000)
    # Not strftime: its %Y gives "1", not "0001", for small years on glibc.
    text = "{:04d}-{:02d}-{:02d}T{:02d}:{:02d}:{:02d}".format(*time.gmtime(seconds)[:6])
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

    For code written against the pydantic-based original, ``model_dump``,
    ``model_dump_json``, ``model_validate``, ``model_validate_json`` and
    ``model_copy`` behave like their pydantic namesakes.
    """

    __slots__ = ("id", "topic", "payload", "headers", "_ts", "reply_to", "correlation_id")

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
        self.id = id if id is not None else _id_template % next(_ids)
        self.topic = topic
        self.payload = payload
        self.headers = headers if headers is not None else {}
        self._ts: Any = time.time() if timestamp is None else timestamp
        self.reply_to = reply_to
        self.correlation_id = correlation_id

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
        return _dumps(self._wire_dict())

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

    __hash__ = None  # type: ignore[assignment]  # mutable, like the original

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


def _make_message(
    topic: str,
    payload: Any,
    headers: Dict[str, Any],
    reply_to: Optional[str] = None,
    correlation_id: Optional[str] = None,
) -> Message:
    """Build a Message without the keyword parsing of ``Message.__init__``.

    The publish path is dominated by message construction; this halves it.
    """
    message = _new_object(Message)
    message.id = _id_template % next(_ids)
    message.topic = topic
    message.payload = payload
    message.headers = headers
    message._ts = _now()
    message.reply_to = reply_to
    message.correlation_id = correlation_id
    return message


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


def _dumps(obj: Any) -> str:
    try:
        return _encoder.encode(obj)
    except SerializationError:
        raise
    except ValueError as exc:  # NaN / Infinity, circular references
        raise SerializationError(f"payload is not valid JSON: {exc}") from None
    except RecursionError:
        raise SerializationError("payload is nested too deeply to encode") from None
    except TypeError as exc:  # e.g. dict keys that JSON cannot represent
        raise SerializationError(f"payload is not JSON serializable: {exc}") from None


def encode(message: Message, *, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> bytes:
    """Encode ``message`` as one wire frame: 4-byte big-endian length + JSON.

    Raises SerializationError (a TypeError) for values JSON cannot carry and
    FrameTooLargeError (a ValueError) if the body exceeds ``max_frame_size``.
    """
    try:
        body = _dumps(message._wire_dict()).encode("utf-8")
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
        obj = _decoder.decode(text)
    except RecursionError:
        raise FrameError("frame JSON is nested too deeply") from None
    except ValueError as exc:
        raise FrameError(f"frame is not valid JSON: {exc}") from None
    return _message_from_dict(obj)


def _optional_str(obj: Dict[str, Any], key: str) -> Optional[str]:
    value = obj.get(key)
    if value is None or type(value) is str:
        return value
    raise FrameError(f"frame field {key!r} must be a string or null, not {type(value).__name__}")


def _is_datetime(value: Any) -> bool:
    datetime_mod = sys.modules.get("datetime")
    return datetime_mod is not None and isinstance(value, datetime_mod.datetime)


def _message_from_dict(obj: Any) -> Message:
    if type(obj) is not dict:
        raise FrameError(f"frame must be a JSON object, not {type(obj).__name__}")
    topic = obj.get("topic")
    if topic is None:
        raise FrameError("frame has no 'topic'")
    try:
        validate_topic(topic, allow_reserved=True)
    except TopicError as exc:
        raise FrameError(f"frame has an invalid topic: {exc}") from None
    headers = obj.get("headers")
    if headers is None:
        headers = {}
    elif type(headers) is not dict:
        raise FrameError(f"frame field 'headers' must be an object, not {type(headers).__name__}")
    ts = obj.get("timestamp")
    if ts is None:
        ts = time.time()
    elif type(ts) is str:
        match = _ISO_RE.fullmatch(ts)
        if match is None:
            raise FrameError(f"frame timestamp {ts!r:.80} is not ISO 8601")
        if match.group(3) > "28":  # e.g. 2023-02-29: reject now, not when read
            _parse_timestamp(ts)
    elif not _is_datetime(ts):  # model_validate() may pass a datetime through
        ts = _parse_timestamp(ts)
    return Message(
        topic,
        obj.get("payload"),
        id=_optional_str(obj, "id"),
        headers=headers,
        timestamp=ts,
        reply_to=_optional_str(obj, "reply_to"),
        correlation_id=_optional_str(obj, "correlation_id"),
    )


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
        buffer += data
        frames: List[bytes] = []
        pos = 0
        end = len(buffer)
        while end - pos >= _HEADER_SIZE:
            size = int.from_bytes(buffer[pos : pos + _HEADER_SIZE], "big")
            if size > self.max_frame_size:
                buffer.clear()
                error = FrameTooLargeError(
                    f"frame length {size} exceeds max_frame_size {self.max_frame_size}"
                )
                error.frames = frames  # type: ignore[attr-defined]
                raise error
            start = pos + _HEADER_SIZE
            if end - start < size:
                break
            frames.append(bytes(buffer[start : start + size]))
            pos = start + size
        if pos:
            del buffer[:pos]
        return frames



# ---------------------------------------------------------------------------
# 4. Transports: the ABC and the in-memory transport
# ---------------------------------------------------------------------------

#: Topics with these prefixes are request inboxes.  A message sent to one
#: that nobody awaits (a late reply after a timeout) is dropped and counted,
#: never buffered, so abandoned requests leave no state behind.
INBOX_PREFIXES = ("_reply.", "_rpc_reply.")


def _resolve_future(future: Any) -> None:
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
        self._future: Any = None
        self._loop: Any = None

    def arm_sync(self) -> _Waiter:
        lock = self._lock = threading.Lock()
        lock.acquire()
        return self

    def arm_async(self, loop: Any) -> _Waiter:
        self._loop = loop
        self._future = loop.create_future()
        return self

    def fulfil(self, message: Optional[Message]) -> None:
        self.message = message
        self.done = True
        if self._lock is not None:
            self._lock.release()
        elif self._future is not None:
            try:
                self._loop.call_soon_threadsafe(_resolve_future, self._future)
            except RuntimeError:  # its event loop is closed; nobody is waiting
                pass


def _settle(waiter: _Waiter, owner_lock: Any, abandon: Callable[[], None]) -> bool:
    """After a wait ended early: True if the waiter was fulfilled after all,
    else withdraw it (under the owner's lock, so no delivery races us)."""
    with owner_lock:
        if waiter.done:
            return True
        abandon()
        return False


def _wait_sync(
    waiter: _Waiter, owner_lock: Any, timeout: Optional[float], abandon: Callable[[], None]
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
    owner_lock: Any,
    timeout: Optional[float],
    abandon: Callable[[], None],
    requeue: Callable[[Message], None],
) -> Optional[Message]:
    """Await ``waiter``; on cancellation a message already handed over is requeued."""
    import asyncio

    if waiter.done:
        return waiter.message
    # A timer resolves the future at the deadline.  Not asyncio.wait_for:
    # before Python 3.12 it swallows a cancellation that races a hand-over.
    timer = None
    if timeout is not None:
        timer = waiter._loop.call_later(max(timeout, 0), _resolve_future, waiter._future)
    try:
        await waiter._future
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
    At most ``maxsize`` messages are held; extra ones are dropped and logged.
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
                logger.warning("inbox %r is full; dropped message %s", self.topic, message.id)

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
            except Exception as exc:
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


def _count_value(counter: Any) -> int:
    """Current value of an ``itertools.count`` without advancing it."""
    return int(repr(counter)[6:-1])  # "count(42)"; pickling support is deprecated


class _Subscription:
    __slots__ = ("id", "pattern", "callback", "on_error", "active")

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
    mailbox (FIFO, at most ``max_queue_size``; a full mailbox makes ``send``
    raise TransportFullError).  Drained mailboxes are removed, and messages
    to inbox topics nobody awaits are dropped, so nothing accumulates.
    """

    def __init__(self, max_queue_size: int = 1000) -> None:
        if not isinstance(max_queue_size, int) or max_queue_size < 1:
            raise ValueError(f"max_queue_size must be a positive int, not {max_queue_size!r}")
        self.max_queue_size = max_queue_size
        self._lock = threading.Lock()
        self._subscriptions = SubscriptionTrie()
        self._mailboxes: Dict[str, Deque[Message]] = {}
        self._waiters: Dict[str, Deque[_Waiter]] = {}
        self._inboxes: Dict[str, Inbox] = {}
        self._sub_ids = itertools.count(1)
        self._closed = False
        self._sent = itertools.count()  # next() is atomic: no lock on the fast path
        self._handler_errors = 0
        self._dropped = 0

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
        subscriptions = trie._cache.get(topic)
        if subscriptions is None:
            subscriptions = trie.match(topic)
        # Fast path: subscribers only.  Receivers and inboxes need the lock.
        if self._inboxes or self._waiters or not subscriptions:
            with self._lock:
                if self._closed:
                    raise TransportClosedError("MemoryTransport is closed")
                if not self._hand_over(topic, message) and not subscriptions:
                    self._keep(topic, message)
        next(self._sent)
        for subscription in subscriptions:
            if subscription.active:
                try:
                    subscription.callback(message)
                except Exception as exc:
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
        # Called with self._lock held, for a message nobody took.
        if topic.startswith(INBOX_PREFIXES):
            self._dropped += 1
            logger.debug("dropped %s on %r: nobody awaits that reply", message.id, topic)
            return
        mailbox = self._mailboxes.get(topic)
        if mailbox is None:
            self._mailboxes[topic] = collections.deque((message,))
        elif len(mailbox) < self.max_queue_size:
            mailbox.append(message)
        else:
            raise TransportFullError(
                f"mailbox of {topic!r} holds max_queue_size={self.max_queue_size} "
                "unconsumed messages; receive from it or subscribe"
            )

    def _handler_failed(
        self, subscription: _Subscription, message: Message, exc: Exception
    ) -> None:
        if subscription.on_error is not None:
            subscription.on_error(subscription.callback, message, exc)
            return
        with self._lock:
            self._handler_errors += 1
        logger.error(
            "subscriber %s on %r failed for message %s on %r",
            _callable_name(subscription.callback),
            subscription.pattern,
            message.id,
            message.topic,
            exc_info=True,
        )

    def _take(
        self, topic: str, timeout: Optional[float]
    ) -> Tuple[Optional[Message], Optional[_Waiter]]:
        # Called with self._lock held: pop from the mailbox or register a waiter.
        mailbox = self._mailboxes.get(topic)
        if mailbox:
            message = mailbox.popleft()
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
                if topic.startswith(INBOX_PREFIXES):
                    self._dropped += 1
                    return
                self._mailboxes.setdefault(topic, collections.deque()).appendleft(message)

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
        subscription.active = False
        return True

    def open_inbox(self, topic: str) -> Inbox:
        """Register an inbox for the exact ``topic`` (see :meth:`Transport.open_inbox`)."""
        _refuse_receive_pattern(topic)
        validate_topic(topic)
        inbox = Inbox(topic, on_close=self._close_inbox, maxsize=self.max_queue_size)
        with self._lock:
            if self._closed:
                raise TransportClosedError("MemoryTransport is closed")
            if topic in self._inboxes:
                raise ValueError(f"an inbox for {topic!r} is already open")
            self._inboxes[topic] = inbox
            for message in self._mailboxes.pop(topic, ()):
                inbox.put(message)
        return inbox

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
            self._inboxes.clear()
            for waiter in waiters:
                waiter.fulfil(None)
        self._subscriptions.clear()
        for inbox in inboxes:
            inbox.close()

    @property
    def stats(self) -> Dict[str, int]:
        """Counters (sent, handler_errors, dropped) and current sizes."""
        with self._lock:
            return {
                "sent": _count_value(self._sent),
                "handler_errors": self._handler_errors,
                "dropped": self._dropped,
                "subscriptions": len(self._subscriptions),
                "mailboxes": len(self._mailboxes),
                "buffered": sum(len(m) for m in self._mailboxes.values()),
                "receivers": sum(len(w) for w in self._waiters.values()),
                "inboxes": len(self._inboxes),
            }

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._subscriptions)} subscriptions"
        return f"<MemoryTransport {state}>"



# ---------------------------------------------------------------------------
# 5. TCP transports
# ---------------------------------------------------------------------------

# Frames are those of section 3.  Peers that speak our handshake exchange a
# few control frames on reserved ``$`` topics (see docs/tcp.md):
#
#   client -> server  $hello     {version, features, nonce, ping_interval}
#   server -> client  $welcome   {version, features, auth, nonce, max_frame_size, ping_interval}
#   client -> server  $auth      {proof}             only when the server has a secret
#   server -> client  $ready     {proof}             only when the server has a secret
#   client -> server  $interest  {add: [...], remove: [...]}
#   server -> client  $ack       {n}                 data frames received so far
#   either way        $ping {} / $pong {}
#   server -> client  $error     {code, reason}      just before the server closes
#
# A peer whose first frame is not ``$hello`` speaks plain frames (the original
# eventforge client): it receives every message the server routes, and is
# refused when the server has a secret.
#
# I/O model: one selector thread per server (accepts, reads, and writes what
# the kernel would not take at once) and one per client; a sender writes
# directly from its own thread when the connection is idle, so a request or a
# reply costs no thread hop on the way out.  Messages that arrive from the
# network reach inboxes and blocked receivers straight from the I/O thread,
# while subscriber callbacks run on one dispatcher thread per transport, in
# arrival order, so a handler may block (even on a request over the same
# connection) without stalling any socket.

#: Version of the handshake protocol spoken by this module.
PROTOCOL_VERSION = 1
#: Default TCP port of the original eventforge.
DEFAULT_TCP_PORT = 9090

_FEATURES = frozenset(("interest", "ack", "ping"))
_HANDSHAKE_MAX_FRAME = 4096  # read cap before a secret-protected peer has authenticated
_AUTH_LABEL_CLIENT = b"eventforge-v1 client"
_AUTH_LABEL_SERVER = b"eventforge-v1 server"
_ACK_EVERY = 512  # acknowledge at once after this many data frames, else on the next tick
_ACK_DELAY = 0.02
_RECV_SIZE = 256 * 1024
_DISPATCH_HIGH_WATER = 20000  # stop reading sockets while this many deliveries wait
_DISPATCH_LOW_WATER = 5000
_conn_ids = itertools.count(1)

# Counters always present in TCPServerTransport.stats (each refusal has its own).
_SERVER_COUNTERS = (
    "accepted", "refused_connections", "accept_errors", "disconnects", "messages_in",
    "messages_out", "bytes_in", "mailbox_full", "frame_errors", "oversize_frames",
    "truncated_frames", "resets", "frame_timeouts", "handshake_timeouts", "auth_failures",
    "tls_failures", "protocol_errors", "slow_consumers", "dead_peers", "internal_errors",
)
_CLIENT_COUNTERS = (
    "messages_out", "messages_in", "buffered", "full", "resent", "disconnects",
    "reconnect_attempts", "reconnects", "dead_peers", "mailbox_full", "frame_errors",
    "oversize_frames", "protocol_errors",
)

# Connection states
_TLS, _NEW, _AUTH, _READY = "tls", "new", "auth", "ready"

# Results of _Connection.enqueue
_OK, _CLOSED, _OVERFLOW = 0, 1, 2
# Results of _Connection.defer
_WRITE_NOW, _WRITE_SCHEDULE, _WRITE_PENDING = 0, 1, 2
_HOT_GAP = 25e-6  # frames closer than this are batched by the I/O thread
_perf_counter = time.perf_counter


def _control_frame(topic: str, payload: Dict[str, Any]) -> bytes:
    """Encode a small control frame (only ``topic`` and ``payload`` keys)."""
    body = _dumps({"topic": topic, "payload": payload}).encode("utf-8")
    return len(body).to_bytes(4, "big") + body


_CONTROL_PREFIX = b'{"topic":"$'


def _fast_control(body: bytes) -> Optional[Tuple[str, Any]]:
    """Parse a control frame written in our compact form; None for anything else.

    Saves building a Message for the frames our own peers send most.  Any
    other shape (or invalid JSON) is left to the full :func:`decode`.
    """
    if not body.startswith(_CONTROL_PREFIX):
        return None
    try:
        obj = _decoder.decode(body.decode("utf-8"))
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    if type(obj) is not dict or len(obj) != 2:
        return None
    topic = obj.get("topic")
    if type(topic) is not str or not _TOPIC_RE.fullmatch(topic) or len(topic) > 64:
        return None
    return topic, obj.get("payload")


_json_string = json.JSONEncoder(ensure_ascii=False).encode


def _json_topic(topic: str) -> str:
    # A valid topic has no control characters; only '"' and '\\' need escapes.
    if '"' in topic or "\\" in topic:
        return _json_string(topic)
    return '"' + topic + '"'


def _interest_frame(added: Optional[str], removed: List[str]) -> bytes:
    """``$interest`` adding one pattern and/or removing some (all already valid).

    Byte-identical to ``_control_frame("$interest", {"add": [...], "remove": [...]})``
    with the empty list left out.
    """
    parts = []
    if added is not None:
        parts.append('"add":[' + _json_topic(added) + "]")
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


def _would_block_errors(tls: bool) -> Tuple[Type[BaseException], ...]:
    if tls:
        ssl = _ssl_module()
        return (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)
    return (BlockingIOError, InterruptedError)


def _describe_garbage(header: bytes) -> str:
    """Name the likely protocol behind a nonsensical length prefix."""
    if header[:1] == b"\x16" and header[1:2] == b"\x03":
        return " (this looks like a TLS ClientHello: the peer uses TLS, this port does not)"
    if header[:4] in (b"GET ", b"POST", b"HEAD", b"PUT ", b"OPTI", b"DELE", b"PATC", b"CONN"):
        return " (this looks like an HTTP request)"
    return ""


def _peer_name(address: Any) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        host = address[0]
        return f"[{host}]:{address[1]}" if ":" in str(host) else f"{host}:{address[1]}"
    return str(address)


class _Connection:
    """One TCP peer: its socket, frame decoder, protocol state and outbound queue.

    ``enqueue`` appends whole frames under a lock, so frames from many
    threads never interleave; ``write`` sends what the kernel takes without
    blocking and is entered by one thread at a time.
    """

    __slots__ = (
        "sock", "peer", "id", "decoder", "tls", "lock", "out", "out_bytes",
        "max_outbound", "cur", "writing", "blocked", "closed", "state", "handshake",
        "features", "nonce", "peer_nonce", "opened", "last_recv", "frame_started",
        "ping_sent", "received", "acked", "interest", "events", "paused",
        "bytes_in", "peer_ping", "last_push", "scheduled",
    )

    def __init__(
        self, sock: Any, peer: str, max_frame_size: int, max_outbound: int, tls: bool
    ) -> None:
        self.sock = sock
        self.peer = peer
        self.id = next(_conn_ids)
        self.decoder = FrameDecoder(max_frame_size)
        self.tls = tls
        self.lock = threading.Lock()
        self.out: Deque[bytes] = collections.deque()
        self.out_bytes = 0
        self.max_outbound = max_outbound
        self.cur: Any = None  # the chunk being written (TLS retries it unchanged)
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
        self.peer_ping: Optional[float] = None
        self.last_push = 0.0
        self.scheduled = False  # a flush by the I/O thread is pending

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
            return _OK

    def write(self) -> Optional[bool]:
        """Send queued bytes without blocking.

        Returns True when everything was sent, False when the kernel buffer is
        full (the caller arranges for EVENT_WRITE), None when another thread is
        writing or the connection is closed.  Raises OSError if the socket broke.
        """
        with self.lock:
            if self.writing or self.closed:
                return None
            if self.cur is None and not self.out:
                return True
            self.writing = True
        sock = self.sock
        try:
            while True:
                with self.lock:
                    data = self.cur
                    if data is None:
                        out = self.out
                        if not out:
                            self.writing = False
                            self.blocked = False
                            return True
                        data = out.popleft() if len(out) == 1 else b"".join(out)
                        out.clear()
                        self.cur = data
                try:
                    sent = sock.send(data)
                except _would_block_errors(self.tls):
                    sent = 0
                with self.lock:
                    self.out_bytes -= sent
                    if sent == len(data):
                        self.cur = None
                        continue
                    if sent:
                        self.cur = memoryview(data)[sent:] if not self.tls else data
                    self.writing = False
                    self.blocked = True
                    return False
        except BaseException:
            with self.lock:
                self.writing = False
            raise

    def defer(self) -> int:
        """Decide who writes a frame just queued by a sending thread.

        Returns _WRITE_NOW when the connection was idle (the sender writes at
        once: no thread hop, lowest latency); while frames follow each other
        closer than ``_HOT_GAP`` it returns _WRITE_SCHEDULE once (the caller
        asks the I/O thread to flush) and _WRITE_PENDING after that, so a
        busy sender pays for no syscall and the I/O thread writes whole
        batches.
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

    @property
    def buffered(self) -> int:
        """Bytes waiting to be sent plus bytes of an incomplete incoming frame."""
        return self.out_bytes + self.decoder.buffered


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


def _socketpair() -> Tuple[Any, Any]:
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


class _Dispatcher:
    """Runs subscriber callbacks for network messages on one named thread, in order.

    The I/O thread hands over batches; a handler may block (on a request over
    the very same connection, say) without stalling any socket.  ``backlog``
    lets the I/O thread stop reading while too much waits here.  A bare lock
    serves as the wake-up signal: cheaper than a Condition on this hot path.
    """

    def __init__(self, name: str, local: MemoryTransport, on_low: Callable[[], None]) -> None:
        self.name = name
        self._local = local
        self._on_low = on_low
        self._mutex = threading.Lock()
        self._signal = threading.Lock()
        self._signal.acquire()
        self._items: Deque[Tuple[Tuple[Any, ...], Message]] = collections.deque()
        self._thread: Optional[threading.Thread] = None
        self._sleeping = False
        self._idle = True
        self._stopping = False
        self.backlog = 0
        self.high = False

    def put_many(self, items: List[Tuple[Tuple[Any, ...], Message]]) -> None:
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
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
            elif self._sleeping:
                self._sleeping = False
                wake = True
        if wake:
            self._signal.release()

    def _run(self) -> None:
        items = self._items
        mutex = self._mutex
        while True:
            with mutex:
                if not items:
                    self._idle = True
                    if self._stopping:
                        return
                    self._sleeping = True
                    batch = None
                else:
                    batch = list(items)
                    items.clear()
            if batch is None:
                self._signal.acquire()
                continue
            for subscriptions, message in batch:
                for subscription in subscriptions:
                    if subscription.active:
                        try:
                            subscription.callback(message)
                        except Exception as exc:
                            self._local._handler_failed(subscription, message, exc)
            with mutex:
                self.backlog -= len(batch)
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

    def stop(self, timeout: float) -> None:
        """Deliver what is queued (up to ``timeout``), then end the thread."""
        self.drain(timeout)
        with self._mutex:
            self._stopping = True
            dropped = len(self._items)
            self._items.clear()
            self.backlog = 0
            wake = self._sleeping
            self._sleeping = False
            thread = self._thread
        if wake:
            self._signal.release()
        if dropped:
            logger.warning("%s: %d messages not delivered at close", self.name, dropped)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)


def _deliver_local(
    local: MemoryTransport, message: Message, taken: bool
) -> Tuple[Any, ...]:
    """Hand ``message`` to the local inbox/receiver/mailbox; return matching subscriptions.

    The MemoryTransport delivery model minus running the callbacks, which the
    caller does inline or on a dispatcher.  ``taken`` says a remote peer
    already took the message, so it is not kept in a mailbox.  Raises
    TransportFullError if the mailbox is full and TransportClosedError after
    close.
    """
    topic = message.topic
    trie = local._subscriptions
    root = trie._root
    if root.star is None and root.globstar is None and topic.partition(".")[0] not in root.children:
        # No pattern can match (typical for reply topics): skip the match and
        # keep one-off topics out of the trie's match cache.
        subscriptions: Tuple[Any, ...] = ()
    else:
        subscriptions = trie.match(topic)
    with local._lock:
        if local._closed:
            raise TransportClosedError("transport is closed")
        next(local._sent)
        if not local._hand_over(topic, message) and not subscriptions and not taken:
            local._keep(topic, message)
    return subscriptions


class TCPServerTransport(Transport):
    """A TCP listener that is also a full Transport for its own process.

    Messages published on the server (``send``) reach its local subscribers
    (synchronously, like :class:`MemoryTransport`) and every connected client
    whose interest matches; messages arriving from a client reach the local
    subscribers (on the dispatcher thread, in arrival order), inboxes and
    receivers, and the other clients whose interest matches.  A client that
    never sent ``$hello`` (the original eventforge client) receives every
    routed message.

    Call :meth:`start` before use (``port=0`` picks a free port; read
    :attr:`address` afterwards) and :meth:`close` to stop every thread and
    socket.  Limits: ``max_frame_size`` per frame, ``max_connections``
    clients, ``max_outbound_bytes`` queued per client (a client that does not
    read is dropped as a slow consumer), ``handshake_timeout`` for TLS and the
    secret handshake, ``frame_timeout`` for an incomplete frame.  ``secret``
    requires the mutual HMAC-SHA256 handshake; ``ssl_context`` (a server-side
    :class:`ssl.SSLContext`) wraps every connection in TLS.  Every refused
    input is logged with its reason and counted in :attr:`stats`.

    ``dispatch="thread"`` (the default) runs subscriber callbacks for network
    messages on a dispatcher thread, so a handler may block, even on a
    request over this same server.  ``dispatch="inline"`` runs them on the
    I/O thread, which saves a thread hop per message; use it only when
    handlers return quickly and never wait for network traffic (for example
    when they hand the work to an executor): while a handler runs, no socket
    of this server is served.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = DEFAULT_TCP_PORT,
        *,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        max_connections: int = 1024,
        secret: Any = None,
        ssl_context: Any = None,
        ping_interval: Optional[float] = 15.0,
        max_outbound_bytes: int = 16 * 1024 * 1024,
        handshake_timeout: float = 5.0,
        frame_timeout: Optional[float] = 60.0,
        max_queue_size: int = 1000,
        max_interest: int = 10000,
        backlog: int = 512,
        dispatch: str = "thread",
    ) -> None:
        if not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"port must be an int in 0..65535, not {port!r}")
        if dispatch not in ("thread", "inline"):
            raise ValueError(f"dispatch must be 'thread' or 'inline', not {dispatch!r}")
        self.dispatch = dispatch
        self._inline = dispatch == "inline"
        for name, value in (
            ("max_frame_size", max_frame_size),
            ("max_connections", max_connections),
            ("max_outbound_bytes", max_outbound_bytes),
        ):
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
        self.ssl_context = ssl_context
        self._local = MemoryTransport(max_queue_size)
        self._lock = threading.Lock()
        self._listener: Any = None
        self._loop: Optional[_Loop] = None
        self._dispatcher = _Dispatcher(
            "eventforge-tcp-server-dispatch", self._local, self._dispatch_low
        )
        self._conns: Dict[int, _Connection] = {}
        # Routing tables, written by the loop thread only, read by any thread
        # (values are replaced, never mutated: copy on write).
        self._exact: Dict[str, Tuple[_Connection, ...]] = {}
        self._patterns = SubscriptionTrie()
        self._broadcast: Tuple[_Connection, ...] = ()
        self._dirty: Dict[int, _Connection] = {}
        self._fanout: Dict[int, _Connection] = {}  # queued by other threads, to flush
        self._fanout_lock = threading.Lock()
        self._ack_due: Dict[int, _Connection] = {}
        self._ack_at = 0.0
        self._paused = False
        self._accept_paused = False
        self._started = False
        self._closed = False
        self._reads_stopped = threading.Event()
        self._counts: Dict[str, int] = collections.defaultdict(int)
        self._counts.update(dict.fromkeys(_SERVER_COUNTERS, 0))

    # -- lifecycle ----------------------------------------------------------------

    @property
    def address(self) -> Optional[Tuple[str, int]]:
        """The bound ``(host, port)`` after :meth:`start`, else None."""
        if self._listener is None:
            return None
        return self._address

    @property
    def port(self) -> int:
        """The bound port after :meth:`start` (the configured one before)."""
        return self._address[1] if self._listener is not None else self._port

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    def start(self) -> TCPServerTransport:
        """Bind and listen, then serve on a background thread; returns self."""
        import socket

        with self._lock:
            if self._closed:
                raise TransportClosedError("TCPServerTransport is closed")
            if self._started:
                return self
            try:
                family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
                listener = socket.create_server(
                    (self.host, self._port), family=family, backlog=self.backlog
                )
            except OSError as exc:
                raise ConnectionLostError(
                    f"cannot listen on {self.host}:{self._port}: {exc}"
                ) from exc
            listener.setblocking(False)
            self._listener = listener
            self._address = tuple(listener.getsockname()[:2])
            loop = self._loop = _Loop(f"eventforge-tcp-server-io-{self._address[1]}")
            import selectors

            loop.selector.register(listener, selectors.EVENT_READ, listener)
            self._started = True
            loop.start(self._run)
        logger.info("tcp server listening on %s", _peer_name(self._address))
        return self

    def close(self) -> None:
        """Stop accepting and reading, deliver what was read, close every connection.

        Messages already read are dispatched (for up to 5 seconds), acknowledged
        and their replies flushed before the sockets close.  Safe to call twice
        and from a handler.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            loop = self._loop
        if loop is not None:
            loop.call_soon(self._stop_reading)
            self._reads_stopped.wait(5.0)
            self._dispatcher.stop(5.0)
            loop.call_soon(self._shutdown)
            if loop.thread is not None and loop.thread is not threading.current_thread():
                loop.thread.join(5.0)
                if loop.thread.is_alive():  # pragma: no cover - defensive
                    logger.error("tcp server: I/O thread did not stop within 5 s")
        else:
            self._dispatcher.stop(0)
        self._local.close()

    # -- Transport API ------------------------------------------------------------

    def send(self, message: Message) -> None:
        """Route ``message`` to matching clients and deliver it locally."""
        topic = message.topic
        validate_topic(topic)
        if self._local._closed:
            raise TransportClosedError("TCPServerTransport is closed")
        targets, taken = self._targets(topic, None)
        if targets:
            frame = encode(message, max_frame_size=self.max_frame_size)
            self._counts["messages_out"] += len(targets)
            if len(targets) == 1:
                self._push(targets[0], frame)
            else:
                self._push_many(targets, frame)
        subscriptions = _deliver_local(self._local, message, taken)
        for subscription in subscriptions:
            if subscription.active:
                try:
                    subscription.callback(message)
                except Exception as exc:
                    self._local._handler_failed(subscription, message, exc)

    def receive(self, topic: str, timeout: Optional[float] = None) -> Optional[Message]:
        """Take the next message on the exact ``topic`` (published here or by a client)."""
        return self._local.receive(topic, timeout)

    async def receive_async(
        self, topic: str, timeout: Optional[float] = None
    ) -> Optional[Message]:
        """Asyncio-native :meth:`receive`."""
        return await self._local.receive_async(topic, timeout)

    def subscribe(self, topic: str, callback: Callable[[Message], Any]) -> str:
        """Call ``callback`` for messages matching ``topic``, local or from clients."""
        return self._local.subscribe(topic, callback)

    def subscribe_handler(
        self,
        topic: str,
        handler: Callable[[Message], Any],
        on_error: Callable[[Any, Message, BaseException], Any],
    ) -> str:
        """Subscribe ``handler``, routing its exceptions to ``on_error``."""
        return self._local.subscribe_handler(topic, handler, on_error)

    def unsubscribe(self, subscription_id: str) -> bool:
        """Remove a subscription; return False if the id is unknown."""
        return self._local.unsubscribe(subscription_id)

    def open_inbox(self, topic: str) -> Inbox:
        """Open an inbox on the exact ``topic`` (replies from clients land here)."""
        return self._local.open_inbox(topic)

    @property
    def stats(self) -> Dict[str, int]:
        """Local delivery counters plus connection, frame and refusal counters."""
        stats = dict(self._local.stats)
        stats.update(self._counts)
        conns = list(self._conns.values())
        stats["connections"] = len(conns)
        stats["handshake_peers"] = sum(1 for c in conns if c.handshake)
        stats["frame_peers"] = len(self._broadcast)
        stats["outbound_bytes"] = sum(c.out_bytes for c in conns)
        stats["inbound_buffered"] = sum(c.decoder.buffered for c in conns)
        stats["dispatch_backlog"] = self._dispatcher.backlog
        return stats

    def __repr__(self) -> str:
        if self._listener is not None:
            where = _peer_name(self._address)
        else:
            where = f"{self.host}:{self._port}"
        state = "closed" if self._closed else f"{len(self._conns)} connections"
        return f"<TCPServerTransport {where} {state}>"

    # -- routing ------------------------------------------------------------------

    def _targets(self, topic: str, origin: Optional[_Connection]) -> Tuple[List[_Connection], bool]:
        """Connections a message on ``topic`` goes to, and whether there are any.

        A message that went to any connection is not kept in a local mailbox.
        """
        targets = list(self._exact.get(topic, ()))
        if len(self._patterns):
            matched = self._patterns.match(topic)
            if matched:
                if targets:
                    seen = {c.id for c in targets}
                    for conn in matched:
                        if conn.id not in seen:
                            seen.add(conn.id)
                            targets.append(conn)
                else:
                    targets = list({c.id: c for c in matched}.values())
        for conn in self._broadcast:
            if conn is not origin:
                targets.append(conn)
        return targets, bool(targets)

    def _push(self, conn: _Connection, frame: bytes) -> None:
        result = conn.enqueue(frame)
        if result == _OK:
            loop = self._loop
            assert loop is not None
            if loop.in_loop():
                self._dirty[conn.id] = conn
            elif conn.tls or conn.blocked:
                if conn.tls and not conn.scheduled:  # TLS: only its I/O thread writes
                    conn.scheduled = True
                    loop.call_soon(lambda: self._scheduled_flush(conn))
            else:
                decision = conn.defer()
                if decision == _WRITE_NOW:
                    self._flush(conn)
                elif decision == _WRITE_SCHEDULE:
                    loop.call_soon(lambda: self._scheduled_flush(conn))
        elif result == _OVERFLOW:
            self._close_later(
                conn,
                "slow_consumers",
                f"slow consumer: {conn.out_bytes} bytes already queued, "
                f"max_outbound_bytes={self.max_outbound_bytes}",
            )

    def _scheduled_flush(self, conn: _Connection) -> None:
        conn.scheduled = False
        if not conn.closed:
            self._flush(conn)

    def _push_many(self, targets: List[_Connection], frame: bytes) -> None:
        """Fan-out from any thread: queue everywhere, let the I/O thread write.

        One wake-up per batch instead of a system call per connection.
        """
        loop = self._loop
        assert loop is not None
        if loop.in_loop():
            for conn in targets:
                self._push(conn, frame)
            return
        with self._fanout_lock:
            pending = self._fanout
            schedule = not pending
            for conn in targets:
                result = conn.enqueue(frame)
                if result == _OK:
                    pending[conn.id] = conn
                elif result == _OVERFLOW:
                    self._close_later(
                        conn, "slow_consumers",
                        f"slow consumer: {conn.out_bytes} bytes already queued, "
                        f"max_outbound_bytes={self.max_outbound_bytes}",
                    )
        if schedule:
            loop.call_soon(self._flush_fanout)

    def _flush_fanout(self) -> None:
        with self._fanout_lock:
            pending, self._fanout = self._fanout, {}
        for conn in pending.values():
            if not conn.closed and not conn.blocked:
                self._flush(conn)

    def _flush(self, conn: _Connection) -> None:
        """Write ``conn``'s queue now; arrange EVENT_WRITE if the kernel is full."""
        loop = self._loop
        assert loop is not None
        try:
            done = conn.write()
        except OSError as exc:
            counter = "truncated_frames" if conn.decoder.buffered else "resets"
            self._close_later(conn, counter, self._eof_reason(conn, f"write failed: {exc}"))
            return
        if done is False:
            if loop.in_loop():
                self._update_events(conn)
            else:
                loop.call_soon(lambda: self._update_events(conn))

    def _close_later(self, conn: _Connection, counter: str, reason: str) -> None:
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
        import selectors

        loop = self._loop
        assert loop is not None
        loop.ident = threading.get_ident()
        listener = self._listener
        tick_every = 0.25
        next_tick = time.monotonic() + tick_every
        try:
            while loop.thread is not None:
                timeout = max(0.0, next_tick - time.monotonic())
                if self._ack_due:
                    timeout = min(timeout, max(0.0, self._ack_at - time.monotonic()))
                for key, mask in loop.selector.select(timeout):
                    obj = key.data
                    if obj is None:
                        loop.run_calls(drain=True)
                    elif obj is listener:
                        self._guarded(self._accept)
                    else:
                        try:
                            if mask & selectors.EVENT_WRITE:
                                self._on_writable(obj)
                            if mask & selectors.EVENT_READ and not obj.closed:
                                self._on_readable(obj)
                        except Exception:
                            logger.exception("tcp server: internal error on %s", obj.peer)
                            self._drop(obj, "internal_errors", "internal error (see traceback)")
                loop.run_calls()
                if self._ack_due and time.monotonic() >= self._ack_at:
                    self._guarded(self._send_acks)
                if self._dirty:
                    self._guarded(self._flush_dirty)
                now = time.monotonic()
                if now >= next_tick:
                    next_tick = now + tick_every
                    self._guarded(self._tick, now)
                if self._closing_done:
                    break
        except Exception:  # pragma: no cover - a bug; never leave a silent dead server
            logger.exception("tcp server: I/O loop crashed; closing every connection")
        finally:
            self._teardown()

    _closing_done = False

    def _guarded(self, func: Callable[..., Any], *args: Any) -> None:
        """Run a housekeeping step; a bug in it is logged, never kills the loop."""
        try:
            func(*args)
        except Exception:
            self._counts["internal_errors"] += 1
            logger.exception("tcp server: internal error in %s", func.__name__)

    def _flush_dirty(self) -> None:
        dirty = list(self._dirty.values())
        self._dirty.clear()
        for conn in dirty:
            if not conn.closed:
                self._flush(conn)

    def _accept(self) -> None:
        import socket

        listener = self._listener
        for _ in range(256):
            try:
                sock, address = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. EMFILE: log, keep serving the others
                self._counts["accept_errors"] += 1
                logger.error("tcp server: accept failed: %s; pausing accepts for 0.25 s", exc)
                # The listener stays readable: stop watching it until the next
                # tick instead of spinning.
                try:
                    self._loop.selector.unregister(listener)  # type: ignore[union-attr]
                    self._accept_paused = True
                except (KeyError, ValueError):
                    pass
                return
            peer = _peer_name(address)
            if self._reads_stopped.is_set():
                sock.close()
                continue
            if len(self._conns) >= self.max_connections:
                self._counts["refused_connections"] += 1
                logger.warning(
                    "tcp server: refused %s: max_connections=%d reached",
                    peer, self.max_connections,
                )
                if self.ssl_context is None:
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
                tls = self.ssl_context is not None
                if tls:
                    sock = self.ssl_context.wrap_socket(
                        sock, server_side=True, do_handshake_on_connect=False
                    )
            except OSError as exc:
                sock.close()
                self._counts["accept_errors"] += 1
                logger.warning("tcp server: could not set up %s: %s", peer, exc)
                continue
            limit = _HANDSHAKE_MAX_FRAME if self._key is not None else self.max_frame_size
            conn = _Connection(sock, peer, limit, self.max_outbound_bytes, tls)
            self._conns[conn.id] = conn
            self._counts["accepted"] += 1
            if not tls and self._key is None:
                self._broadcast = self._broadcast + (conn,)
            self._update_events(conn)
            if tls:
                self._tls_handshake(conn)

    def _update_events(self, conn: _Connection) -> None:
        import selectors

        if conn.closed:
            return
        events = 0 if (self._paused or conn.paused) else selectors.EVENT_READ
        if conn.blocked:
            events |= selectors.EVENT_WRITE
        if events == conn.events:
            return
        selector = self._loop.selector  # type: ignore[union-attr]
        if conn.events == 0:
            selector.register(conn.sock, events, conn)
        elif events == 0:
            selector.unregister(conn.sock)
        else:
            selector.modify(conn.sock, events, conn)
        conn.events = events

    def _tls_handshake(self, conn: _Connection) -> None:
        ssl = _ssl_module()
        try:
            conn.sock.do_handshake()
        except ssl.SSLWantReadError:
            if conn.blocked:
                conn.blocked = False
                self._update_events(conn)
            return
        except ssl.SSLWantWriteError:
            conn.blocked = True
            self._update_events(conn)
            return
        except (ssl.SSLError, OSError) as exc:
            self._drop(conn, "tls_failures", f"TLS handshake failed: {exc}")
            return
        conn.state = _NEW
        conn.blocked = False
        self._update_events(conn)
        if self._key is None:
            self._broadcast = self._broadcast + (conn,)

    def _on_writable(self, conn: _Connection) -> None:
        if conn.state == _TLS:
            self._tls_handshake(conn)
            return
        conn.blocked = False
        self._flush(conn)
        if not conn.blocked:
            self._update_events(conn)

    def _on_readable(self, conn: _Connection) -> None:
        if conn.state == _TLS:
            self._tls_handshake(conn)
            return
        sock = conn.sock
        try:
            data = sock.recv(_RECV_SIZE)
            if conn.tls and data:
                while sock.pending():
                    data += sock.recv(_RECV_SIZE)
        except _would_block_errors(conn.tls):
            return
        except ConnectionResetError:
            self._drop(conn, "resets", self._eof_reason(conn, "connection reset by peer"))
            return
        except OSError as exc:
            self._drop(conn, "resets", self._eof_reason(conn, f"read failed: {exc}"))
            return
        if not data:
            if conn.decoder.buffered:
                self._drop(conn, "truncated_frames", self._eof_reason(conn, "peer closed"))
            else:
                self._drop(conn, "disconnects", "peer closed the connection", logging.DEBUG)
            return
        now = time.monotonic()
        conn.last_recv = now
        conn.ping_sent = False
        conn.bytes_in += len(data)
        self._counts["bytes_in"] += len(data)
        try:
            bodies = conn.decoder.feed(data)
        except FrameTooLargeError as exc:
            for body in getattr(exc, "frames", ()):
                self._on_frame(conn, body)
            self._drop(conn, "oversize_frames",
                       f"{exc}; closed before buffering the body{_describe_garbage(data[:4])}")
            return
        if conn.decoder.buffered == 0:
            conn.frame_started = None
        elif bodies or conn.frame_started is None:
            conn.frame_started = now
        batch: List[Tuple[Tuple[Any, ...], Message]] = []
        for body in bodies:
            if conn.closed:
                break
            self._on_frame(conn, body, batch)
        if batch:
            if self._inline:
                self._run_inline(batch)
            else:
                self._dispatcher.put_many(batch)
                if self._dispatcher.high and not self._paused:
                    self._set_paused(True)
        if conn.handshake and conn.received != conn.acked and "ack" in conn.features:
            if conn.received - conn.acked >= _ACK_EVERY:
                self._ack(conn)
            else:
                if not self._ack_due:
                    self._ack_at = time.monotonic() + _ACK_DELAY
                self._ack_due[conn.id] = conn

    @staticmethod
    def _eof_reason(conn: _Connection, what: str) -> str:
        buffered = conn.decoder.buffered
        if buffered:
            return f"{what} in the middle of a frame ({buffered} bytes of it received)"
        return what

    def _on_frame(
        self, conn: _Connection, body: bytes,
        batch: Optional[List[Tuple[Tuple[Any, ...], Message]]] = None,
    ) -> None:
        control = _fast_control(body)
        if control is not None:
            self._on_control(conn, control[0], control[1])
            return
        try:
            message = decode(body)
        except FrameError as exc:
            if conn.state != _READY and self._key is not None:
                self._drop(conn, "auth_failures",
                           f"authentication required; first frame was invalid: {exc}")
                return
            conn.received += 1
            self._counts["frame_errors"] += 1
            logger.warning("tcp server: rejected a frame from %s: %s", conn.peer, exc)
            return
        topic = message.topic
        if topic[0] == "$":
            self._on_control(conn, topic, message.payload)
            return
        if conn.state != _READY:
            if conn.state == _NEW and self._key is None:
                conn.state = _READY  # a frame-only peer (the original client)
            else:
                self._drop(conn, "auth_failures",
                           "authentication required: a message arrived before the handshake")
                return
        conn.received += 1
        self._counts["messages_in"] += 1
        self._route_incoming(conn, message, body, batch)

    def _route_incoming(
        self, origin: _Connection, message: Message, body: bytes,
        batch: Optional[List[Tuple[Tuple[Any, ...], Message]]],
    ) -> None:
        topic = message.topic
        targets, taken = self._targets(topic, origin)
        if targets:
            frame = len(body).to_bytes(4, "big") + body
            self._counts["messages_out"] += len(targets)
            for conn in targets:
                self._push(conn, frame)
        try:
            subscriptions = _deliver_local(self._local, message, taken)
        except TransportFullError as exc:
            self._counts["mailbox_full"] += 1
            logger.warning("tcp server: dropped %s from %s: %s", message.id, origin.peer, exc)
            return
        except TransportClosedError:
            return
        if subscriptions:
            if batch is not None:
                batch.append((subscriptions, message))
            elif self._inline:
                self._run_inline([(subscriptions, message)])
            else:
                self._dispatcher.put_many([(subscriptions, message)])

    def _run_inline(self, batch: List[Tuple[Tuple[Any, ...], Message]]) -> None:
        # dispatch="inline": callbacks run here, on the I/O thread.
        for subscriptions, message in batch:
            for subscription in subscriptions:
                if subscription.active:
                    try:
                        subscription.callback(message)
                    except Exception as exc:
                        self._local._handler_failed(subscription, message, exc)

    # -- control frames ---------------------------------------------------------------

    def _on_control(self, conn: _Connection, topic: str, payload: Any) -> None:
        if not isinstance(payload, dict):
            payload = {}
        state = conn.state
        if topic == "$hello" and state == _NEW and not conn.handshake:
            self._on_hello(conn, payload)
        elif topic == "$auth" and state == _AUTH:
            self._on_auth(conn, payload)
        elif state != _READY:
            self._drop(conn, "protocol_errors" if self._key is None else "auth_failures",
                       f"unexpected {topic!r} frame during the handshake")
        elif topic == "$ping":
            self._push(conn, _control_frame("$pong", {}))
        elif topic == "$pong":
            pass
        elif topic == "$interest" and conn.handshake:
            self._on_interest(conn, payload)
        else:
            self._counts["protocol_errors"] += 1
            logger.warning("tcp server: ignored unknown control frame %r from %s", topic, conn.peer)

    def _on_hello(self, conn: _Connection, payload: Dict[str, Any]) -> None:
        version = payload.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            self._refuse(conn, "protocol_errors", "protocol",
                         f"unsupported handshake version {version!r:.40}")
            return
        features = payload.get("features")
        if isinstance(features, list):
            conn.features = frozenset(f for f in features if isinstance(f, str)) & _FEATURES
        ping = payload.get("ping_interval")
        if isinstance(ping, (int, float)) and not isinstance(ping, bool) and ping > 0:
            conn.peer_ping = float(ping)
        conn.handshake = True
        if "interest" in conn.features:  # else it keeps receiving everything
            self._broadcast = tuple(c for c in self._broadcast if c is not conn)
        welcome: Dict[str, Any] = {
            "version": PROTOCOL_VERSION,
            "features": sorted(conn.features),
            "auth": None,
            "max_frame_size": self.max_frame_size,
            "ping_interval": self.ping_interval,
        }
        if self._key is not None:
            nonce = _nonce_from(payload.get("nonce"))
            if nonce is None:
                self._refuse(conn, "auth_failures", "auth",
                             "authentication required: $hello carried no valid nonce")
                return
            conn.peer_nonce = nonce
            conn.nonce = os.urandom(32)
            welcome["auth"] = "hmac-sha256"
            welcome["nonce"] = conn.nonce.hex()
            conn.state = _AUTH
        else:
            conn.state = _READY
        self._push(conn, _control_frame("$welcome", welcome))

    def _on_auth(self, conn: _Connection, payload: Dict[str, Any]) -> None:
        key = self._key
        assert key is not None
        expected = _proof(key, _AUTH_LABEL_CLIENT, conn.peer_nonce, conn.nonce)
        if not _proof_matches(expected, payload.get("proof")):
            self._refuse(conn, "auth_failures", "auth", "authentication failed: wrong secret")
            return
        conn.state = _READY
        conn.decoder.max_frame_size = self.max_frame_size
        proof = _proof(key, _AUTH_LABEL_SERVER, conn.nonce, conn.peer_nonce)
        self._push(conn, _control_frame("$ready", {"proof": proof.hex()}))

    def _refuse(self, conn: _Connection, counter: str, code: str, reason: str) -> None:
        """Tell a handshaking peer why it is refused, then close it."""
        if conn.enqueue(_control_frame("$error", {"code": code, "reason": reason})) == _OK:
            try:
                conn.write()
            except OSError:
                pass
        self._drop(conn, counter, reason)

    def _on_interest(self, conn: _Connection, payload: Dict[str, Any]) -> None:
        added = payload.get("add") or []
        removed = payload.get("remove") or []
        if not isinstance(added, list) or not isinstance(removed, list):
            self._counts["protocol_errors"] += 1
            logger.warning("tcp server: malformed $interest from %s", conn.peer)
            return
        for pattern in removed:
            if isinstance(pattern, str) and pattern in conn.interest:
                del conn.interest[pattern]
                self._remove_route(conn, pattern)
        for pattern in added:
            if not isinstance(pattern, str) or pattern in conn.interest:
                continue
            try:
                if "*" in pattern:
                    validate_pattern(pattern)
                else:
                    validate_topic(pattern)
            except TopicError as exc:
                self._counts["protocol_errors"] += 1
                logger.warning("tcp server: ignored interest from %s: %s", conn.peer, exc)
                continue
            if len(conn.interest) >= self.max_interest:
                self._counts["protocol_errors"] += 1
                logger.warning("tcp server: %s exceeds max_interest=%d; ignored %r",
                               conn.peer, self.max_interest, pattern)
                continue
            conn.interest[pattern] = None
            if "*" in pattern:
                self._patterns.add((conn.id, pattern), pattern, conn)
            else:
                self._exact[pattern] = self._exact.get(pattern, ()) + (conn,)
                self._hand_mailbox(conn, pattern)

    def _hand_mailbox(self, conn: _Connection, topic: str) -> None:
        # Messages nobody had taken wait in the server's mailbox; the first
        # client to show interest in that topic takes them (send-then-receive).
        local = self._local
        with local._lock:
            kept = local._mailboxes.pop(topic, None)
        for message in kept or ():
            try:
                self._push(conn, encode(message, max_frame_size=self.max_frame_size))
            except (FrameError, SerializationError):  # pragma: no cover - checked at send
                pass

    def _remove_route(self, conn: _Connection, pattern: str) -> None:
        if "*" in pattern:
            self._patterns.remove((conn.id, pattern))
        else:
            left = tuple(c for c in self._exact.get(pattern, ()) if c is not conn)
            if left:
                self._exact[pattern] = left
            else:
                self._exact.pop(pattern, None)

    def _ack(self, conn: _Connection) -> None:
        conn.acked = conn.received
        self._ack_due.pop(conn.id, None)
        self._push(conn, _control_frame("$ack", {"n": conn.received}))

    def _send_acks(self) -> None:
        for conn in list(self._ack_due.values()):
            if not conn.closed and conn.received != conn.acked:
                self._ack(conn)
        self._ack_due.clear()

    # -- housekeeping -------------------------------------------------------------------

    def _tick(self, now: float) -> None:
        if self._accept_paused and not self._reads_stopped.is_set():
            import selectors

            self._accept_paused = False
            self._loop.selector.register(  # type: ignore[union-attr]
                self._listener, selectors.EVENT_READ, self._listener
            )
        key = self._key
        for conn in list(self._conns.values()):
            if conn.closed:
                continue
            if conn.state != _READY and (conn.state == _TLS or key is not None or conn.handshake):
                if now - conn.opened > self.handshake_timeout:
                    self._drop(conn, "handshake_timeouts",
                               f"handshake not completed within {self.handshake_timeout} s")
                continue
            if (self.frame_timeout is not None and conn.frame_started is not None
                    and now - conn.frame_started > self.frame_timeout):
                self._drop(conn, "frame_timeouts",
                           f"incomplete frame for more than {self.frame_timeout} s "
                           f"(slow sender; {conn.decoder.buffered} bytes received)")
                continue
            interval = self.ping_interval
            if interval and conn.handshake and "ping" in conn.features:
                silent = now - conn.last_recv
                if silent > 2 * interval:
                    self._drop(conn, "dead_peers",
                               f"dead peer: nothing received for {silent:.1f} s")
                elif silent > interval and not conn.ping_sent:
                    conn.ping_sent = True
                    self._push(conn, _control_frame("$ping", {}))

    def _set_paused(self, paused: bool) -> None:
        self._paused = paused
        if paused:
            logger.info("tcp server: %d messages wait for handlers; pausing reads",
                        self._dispatcher.backlog)
        for conn in list(self._conns.values()):
            self._update_events(conn)

    def _dispatch_low(self) -> None:
        loop = self._loop
        if loop is not None:
            loop.call_soon(self._resume_reading)

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
        if self._conns.pop(conn.id, None) is None:
            return
        self._counts[counter] += 1
        logger.log(level, "tcp server: closed %s: %s", conn.peer, reason)
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
        if conn in self._broadcast:
            self._broadcast = tuple(c for c in self._broadcast if c is not conn)
        for pattern in conn.interest:
            self._remove_route(conn, pattern)
        conn.interest.clear()
        self._dirty.pop(conn.id, None)
        self._ack_due.pop(conn.id, None)
        with conn.lock:
            conn.out.clear()
            conn.out_bytes = 0
            conn.cur = None

    def _stop_reading(self) -> None:
        loop = self._loop
        assert loop is not None
        if self._listener is not None:
            try:
                loop.selector.unregister(self._listener)
            except (KeyError, ValueError):
                pass
            self._listener.close()
        self._paused = True
        for conn in list(self._conns.values()):
            self._update_events(conn)
        self._reads_stopped.set()

    def _shutdown(self) -> None:
        # Acknowledge what was read and dispatched, flush replies, then close.
        import selectors

        loop = self._loop
        assert loop is not None
        for conn in list(self._conns.values()):
            if conn.handshake and "ack" in conn.features and conn.received != conn.acked:
                self._ack(conn)
        deadline = time.monotonic() + 1.0
        pending = [c for c in self._conns.values() if c.out_bytes and not c.closed]
        while pending and time.monotonic() < deadline:
            for conn in pending:
                self._flush(conn)
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
        self._closing_done = True

    def _teardown(self) -> None:
        for conn in list(self._conns.values()):
            self._drop(conn, "closed_by_server", "server closing", logging.DEBUG)
        if self._listener is not None:
            try:
                self._listener.close()
            except OSError:
                pass
        self._reads_stopped.set()
        loop = self._loop
        if loop is not None:
            loop.close()


class TCPClientTransport(Transport):
    """A connection to a :class:`TCPServerTransport` (or the original eventforge server).

    Call :meth:`connect` before use.  ``send`` writes straight from the
    caller's thread when the connection is idle and queues otherwise, so
    frames from many threads never interleave.  ``subscribe``, ``receive``
    and request inboxes tell the server what this client wants (its
    *interest*); the server then sends only matching messages.  Subscriber
    callbacks run on one dispatcher thread, in arrival order.

    If the connection drops, the client reconnects (``reconnect=True``) with
    capped exponential backoff and jitter (``backoff_initial`` ..
    ``backoff_max``), re-sends its interest and re-sends, in order, every
    message the server has not acknowledged; up to ``max_pending`` messages
    (and ``max_pending_bytes``) wait meanwhile, beyond that ``send`` raises
    TransportFullError.  While connected, a full buffer makes ``send`` wait
    up to ``send_timeout`` seconds for acknowledgements (a publisher faster
    than the server is slowed down) before raising.  A server that stays silent for two
    ``ping_interval`` s is taken for dead.

    ``secret`` runs the mutual HMAC-SHA256 handshake; ``ssl_context`` (a
    client-side :class:`ssl.SSLContext`) enables TLS, checked against
    ``server_hostname`` (default: ``host``).  A server that does not answer
    ``$hello`` within ``hello_timeout`` is taken for a plain-frame peer (the
    original eventforge server); ``handshake=False`` skips the hello and
    ``handshake=True`` requires it.
    """

    def __init__(
        self,
        host: str = "localhost",
        port: int = DEFAULT_TCP_PORT,
        *,
        secret: Any = None,
        ssl_context: Any = None,
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
        self.max_pending = max_pending
        self.max_pending_bytes = max_pending_bytes
        self.ping_interval = ping_interval
        self.connect_timeout = connect_timeout
        self.hello_timeout = hello_timeout
        self.handshake = handshake
        self.max_frame_size = max_frame_size
        self.send_timeout = send_timeout
        self._send_limit = max_frame_size
        self._local = MemoryTransport(max_queue_size)
        self._lock = threading.Lock()
        self._connect_lock = threading.Lock()
        self._space = threading.Condition(self._lock)
        self._space_waiters = 0
        self._interest: Dict[str, int] = {}
        self._removals: List[str] = []  # interest withdrawn, not yet told to the server
        self._receive_topics: Dict[str, None] = {}
        self._sub_patterns: Dict[str, str] = {}
        # Message frames the server has not acknowledged (or that wait for a
        # connection), in order: [sequence number on this connection, frame].
        self._pending: Deque[List[Any]] = collections.deque()
        self._pending_bytes = 0
        self._seq = 0
        self._ack_mode = False
        self._conn: Optional[_Connection] = None
        self._loop: Optional[_Loop] = None
        self._dispatcher = _Dispatcher(
            f"eventforge-tcp-client-dispatch-{host}:{port}", self._local, self._dispatch_low
        )
        self._closing = threading.Event()
        self._connecting: Any = None
        self._started = False
        self._closed = False
        self._failed: Optional[str] = None
        self._counts: Dict[str, int] = collections.defaultdict(int)
        self._counts.update(dict.fromkeys(_CLIENT_COUNTERS, 0))
        self._messages_out = 0

    # -- lifecycle --------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True while a connection to the server is up."""
        return self._conn is not None

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    @property
    def mode(self) -> Optional[str]:
        """``"handshake"`` (our server), ``"frames"`` (a plain-frame server) or None."""
        conn = self._conn
        if conn is None:
            return None
        return "handshake" if conn.handshake else "frames"

    def connect(self, timeout: Optional[float] = None) -> TCPClientTransport:
        """Connect and handshake within ``timeout`` seconds (default ``connect_timeout``).

        Raises ConnectionLostError (a ConnectionError) if the server cannot be
        reached and AuthenticationError if the secret or TLS handshake fails.
        Returns self.
        """
        if timeout is None:
            timeout = self.connect_timeout
        with self._connect_lock:  # one connect at a time; later ones see _started
            with self._lock:
                if self._closed:
                    raise TransportClosedError("TCPClientTransport is closed")
                if self._started:
                    return self
            opened = self._open(timeout)
            with self._lock:
                if self.closed:  # close() may have run on another thread meanwhile
                    opened[0].close()
                    raise TransportClosedError("TCPClientTransport is closed")
                loop = self._loop = _Loop(f"eventforge-tcp-client-io-{self.host}:{self.port}")
                self._started = True
            self._install(*opened)
            loop.start(self._run)
        return self

    def close(self) -> None:
        """Flush what is queued (up to 1 s), close the socket and stop every thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._space.notify_all()
            # Give the server a moment to acknowledge what it was sent.
            deadline = time.monotonic() + 1.0
            while self._pending and self._conn is not None and self._ack_mode:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._loop is None or self._loop.in_loop():
                    break
                self._space_waiters += 1
                try:
                    self._space.wait(remaining)
                finally:
                    self._space_waiters -= 1
            left = len(self._pending)
            connected = self._conn is not None
        if left:
            logger.warning(
                "tcp client: closed with %d message(s) %s", left,
                "not acknowledged by the server" if connected else "never sent (disconnected)",
            )
        self._closing.set()
        connecting = self._connecting
        if connecting is not None:
            try:
                connecting.close()
            except OSError:
                pass
        loop = self._loop
        if loop is not None:
            loop.wake()
            if loop.thread is not None and loop.thread is not threading.current_thread():
                loop.thread.join(self.connect_timeout + 2.0)
        self._dispatcher.stop(1.0)
        self._local.close()

    # -- Transport API ----------------------------------------------------------------

    def send(self, message: Message) -> None:
        """Send ``message`` to the server; queue it while reconnecting.

        Raises TransportFullError when ``max_pending`` messages already wait,
        ConnectionLostError before :meth:`connect` or after a failure with
        ``reconnect=False``, TransportClosedError after :meth:`close`.
        """
        topic = message.topic
        if type(topic) is not str or topic not in _VALID_TOPICS:
            validate_topic(topic)
        frame = encode(message, max_frame_size=self._send_limit)
        size = len(frame)
        with self._lock:
            conn = self._conn
            if conn is None or self._closed:
                self._send_offline(frame)
                return
            if self._ack_mode:
                pending = self._pending
                if (len(pending) >= self.max_pending
                        or self._pending_bytes + size > self.max_pending_bytes):
                    conn = self._wait_for_space(size)
                    if conn is None:
                        self._send_offline(frame)
                        return
                    if (len(pending) >= self.max_pending
                            or self._pending_bytes + size > self.max_pending_bytes):
                        self._counts["full"] += 1
                        raise TransportFullError(
                            f"{len(pending)} messages ({self._pending_bytes} bytes) are "
                            f"unacknowledged after {self.send_timeout} s; "
                            f"max_pending={self.max_pending}"
                        )
                self._seq += 1
                pending.append([self._seq, frame])
                self._pending_bytes += size
            # Inline _Connection.enqueue (its lock nests inside ours).
            with conn.lock:
                if conn.out_bytes + size > conn.max_outbound:
                    if self._ack_mode:
                        self._seq -= 1
                        self._pending_bytes -= len(self._pending.pop()[1])
                    self._counts["full"] += 1
                    raise TransportFullError(
                        f"{conn.out_bytes} bytes wait for the server; "
                        f"max_pending_bytes={self.max_pending_bytes}"
                    )
                conn.out.append(frame)
                conn.out_bytes += size
            self._messages_out += 1
        self._kick(conn)

    def _send_offline(self, frame: bytes) -> None:
        # Called with self._lock held while there is no connection.
        if self._closed:
            raise TransportClosedError("TCPClientTransport is closed")
        if self._failed is not None:
            raise ConnectionLostError(self._failed)
        if not self._started:
            raise ConnectionLostError(
                f"not connected to {self.host}:{self.port}: call connect() first"
            )
        if (len(self._pending) >= self.max_pending
                or self._pending_bytes + len(frame) > self.max_pending_bytes):
            self._counts["full"] += 1
            raise TransportFullError(
                f"{len(self._pending)} messages ({self._pending_bytes} bytes) wait for "
                f"a connection; max_pending={self.max_pending}"
            )
        self._pending.append([0, frame])
        self._pending_bytes += len(frame)
        self._counts["buffered"] += 1

    def _wait_for_space(self, size: int) -> Optional[_Connection]:
        # Called with self._lock held and the buffer full.  While connected,
        # wait (up to send_timeout) for the server to acknowledge: a publisher
        # faster than the server is slowed down, like a blocking socket
        # write.  While disconnected, fail at once.
        deadline = time.monotonic() + self.send_timeout
        while (self._conn is not None and self._ack_mode and not self._closed
               and (len(self._pending) >= self.max_pending
                    or self._pending_bytes + size > self.max_pending_bytes)):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._space_waiters += 1
            try:
                self._space.wait(remaining)
            finally:
                self._space_waiters -= 1
        if self._closed:
            raise TransportClosedError("TCPClientTransport is closed")
        return self._conn

    def receive(self, topic: str, timeout: Optional[float] = None) -> Optional[Message]:
        """Take the next message on the exact ``topic``.

        The first call registers a lasting interest in ``topic`` with the
        server; from then on messages on it wait here (at most
        ``max_queue_size``) until received.
        """
        self._want_receive(topic)
        return self._local.receive(topic, timeout)

    async def receive_async(
        self, topic: str, timeout: Optional[float] = None
    ) -> Optional[Message]:
        """Asyncio-native :meth:`receive`."""
        self._want_receive(topic)
        return await self._local.receive_async(topic, timeout)

    def subscribe(self, topic: str, callback: Callable[[Message], Any]) -> str:
        """Call ``callback`` (on the dispatcher thread) for messages matching ``topic``."""
        validate_pattern(topic)
        return self._subscribed(topic, self._local.subscribe(topic, callback))

    def subscribe_handler(
        self,
        topic: str,
        handler: Callable[[Message], Any],
        on_error: Callable[[Any, Message, BaseException], Any],
    ) -> str:
        """Subscribe ``handler``, routing its exceptions to ``on_error``."""
        validate_pattern(topic)
        return self._subscribed(topic, self._local.subscribe_handler(topic, handler, on_error))

    def _subscribed(self, topic: str, sub_id: str) -> str:
        with self._lock:
            self._sub_patterns[sub_id] = topic
        self._interest_add(topic)
        return sub_id

    def unsubscribe(self, subscription_id: str) -> bool:
        """Remove a subscription (and the interest, if it was the last for its pattern)."""
        if not self._local.unsubscribe(subscription_id):
            return False
        with self._lock:
            pattern = self._sub_patterns.pop(subscription_id, None)
        if pattern is not None:
            self._interest_remove(pattern)
        return True

    def open_inbox(self, topic: str) -> Inbox:
        """Open an inbox on ``topic`` and tell the server, ahead of the next frame sent."""
        inbox = self._local.open_inbox(topic)
        inner = inbox._on_close

        def on_close(closing: Inbox) -> None:
            if inner is not None:
                inner(closing)
            self._interest_remove(topic)

        inbox._on_close = on_close
        self._interest_add(topic, flush=False)
        return inbox

    @property
    def stats(self) -> Dict[str, Any]:
        """Local delivery counters plus connection and buffering counters."""
        stats: Dict[str, Any] = dict(self._local.stats)
        stats.update(self._counts)
        stats["messages_out"] = self._messages_out
        stats["connected"] = self._conn is not None
        stats["pending"] = len(self._pending)
        stats["pending_bytes"] = self._pending_bytes
        stats["interest"] = len(self._interest)
        stats["dispatch_backlog"] = self._dispatcher.backlog
        return stats

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("connected" if self._conn else "disconnected")
        return f"<TCPClientTransport {self.host}:{self.port} {state}>"

    # -- interest -----------------------------------------------------------------------

    def _want_receive(self, topic: str) -> None:
        _refuse_receive_pattern(topic)
        validate_topic(topic)
        if topic not in self._receive_topics:
            with self._lock:
                if topic in self._receive_topics:
                    return
                self._receive_topics[topic] = None
            self._interest_add(topic)

    def _interest_add(self, pattern: str, flush: bool = True) -> None:
        with self._lock:
            count = self._interest.get(pattern, 0)
            self._interest[pattern] = count + 1
            conn = self._conn
            if count or conn is None or not conn.handshake:
                return
            removed, self._removals = self._removals, []
            conn.enqueue(_interest_frame(pattern, removed))
        if flush:
            self._kick(conn)

    def _interest_remove(self, pattern: str) -> None:
        # Not urgent: rides along with the next $interest, or leaves on a tick.
        with self._lock:
            count = self._interest.get(pattern, 0)
            if count > 1:
                self._interest[pattern] = count - 1
                return
            self._interest.pop(pattern, None)
            conn = self._conn
            if count and conn is not None and conn.handshake and not self._closed:
                self._removals.append(pattern)

    def _flush_removals(self, conn: _Connection) -> None:
        with self._lock:
            if not self._removals or self._conn is not conn:
                return
            removed, self._removals = self._removals, []
            conn.enqueue(_interest_frame(None, removed))

    # -- connection set-up ------------------------------------------------------------------

    def _open(self, timeout: float) -> Tuple[Any, FrameDecoder, bool, frozenset, List[Message]]:
        """Connect and handshake (blocking); return the socket and what was learned."""
        import socket

        deadline = time.monotonic() + timeout
        where = f"{self.host}:{self.port}"
        try:
            sock = socket.create_connection((self.host, self.port), timeout=timeout)
        except socket.timeout:
            raise ConnectionLostError(
                f"cannot connect to {where}: timed out after {timeout} s"
            ) from None
        except OSError as exc:
            raise ConnectionLostError(f"cannot connect to {where}: {exc}") from None
        self._connecting = sock
        try:
            if self._closed:
                raise TransportClosedError("TCPClientTransport is closed")
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            if self.ssl_context is not None:
                ssl = _ssl_module()
                try:
                    sock = self.ssl_context.wrap_socket(
                        sock, server_hostname=self.server_hostname or self.host
                    )
                except (ssl.SSLError, ssl.CertificateError) as exc:
                    raise AuthenticationError(f"TLS handshake with {where} failed: {exc}") from None
                except (OSError, socket.timeout) as exc:
                    raise ConnectionLostError(
                        f"TLS handshake with {where} failed: {exc or 'timed out'} "
                        "(does the server use TLS?)"
                    ) from None
                self._connecting = sock
            decoder = FrameDecoder(self.max_frame_size)
            early: List[Message] = []
            if self.handshake is False:
                sock.setblocking(False)
                return sock, decoder, False, frozenset(), early
            nonce = os.urandom(32)
            hello = Message("$hello", {
                "version": PROTOCOL_VERSION,
                "features": sorted(_FEATURES),
                "nonce": nonce.hex(),
                "ping_interval": self.ping_interval,
            })
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            sock.sendall(encode(hello))
            required = self.handshake is True or self._key is not None
            hello_deadline = deadline
            if not required:
                hello_deadline = min(deadline, time.monotonic() + self.hello_timeout)
            welcome = self._await(sock, decoder, early, "$welcome", hello_deadline)
            if welcome is None:
                if required:
                    raise AuthenticationError(
                        f"{where} did not answer the handshake within "
                        f"{hello_deadline - deadline + timeout:.1f} s (not an eventforge server, "
                        "or one that speaks plain frames only)"
                    )
                logger.info("tcp client: %s did not answer $hello; speaking plain frames", where)
                sock.setblocking(False)
                return sock, decoder, False, frozenset(), early
            features = frozenset(
                f for f in welcome.get("features") or () if isinstance(f, str)
            ) & _FEATURES
            limit = welcome.get("max_frame_size")
            if isinstance(limit, int) and 0 < limit < self.max_frame_size:
                self._send_limit = limit
            if welcome.get("auth"):
                if welcome.get("auth") != "hmac-sha256":
                    raise AuthenticationError(f"{where} asks for unknown auth {welcome['auth']!r}")
                if self._key is None:
                    raise AuthenticationError(f"{where} requires a shared secret (pass secret=)")
                server_nonce = _nonce_from(welcome.get("nonce"))
                if server_nonce is None:
                    raise AuthenticationError(f"{where} sent an invalid nonce")
                proof = _proof(self._key, _AUTH_LABEL_CLIENT, nonce, server_nonce)
                sock.sendall(_control_frame("$auth", {"proof": proof.hex()}))
                ready = self._await(sock, decoder, early, "$ready", deadline)
                if ready is None:
                    raise AuthenticationError(f"{where} did not confirm authentication in time")
                expected = _proof(self._key, _AUTH_LABEL_SERVER, server_nonce, nonce)
                if not _proof_matches(expected, ready.get("proof")):
                    raise AuthenticationError(f"{where} failed to prove it knows the secret")
            elif self._key is not None:
                raise AuthenticationError(
                    f"{where} does not authenticate, so it cannot prove it knows the secret"
                )
            sock.setblocking(False)
            return sock, decoder, True, features, early
        except (EventforgeError, socket.timeout):
            sock.close()
            raise
        except OSError as exc:
            sock.close()
            if self.ssl_context is not None and isinstance(exc, _ssl_module().SSLError):
                raise AuthenticationError(f"TLS session with {where} failed: {exc}") from None
            raise ConnectionLostError(f"handshake with {where} failed: {exc}") from None
        except BaseException:
            sock.close()
            raise
        finally:
            self._connecting = None

    def _await(
        self, sock: Any, decoder: FrameDecoder, early: List[Message], want: str, deadline: float
    ) -> Optional[Dict[str, Any]]:
        """Read until control frame ``want`` arrives; None at ``deadline``."""
        import socket

        where = f"{self.host}:{self.port}"
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
                    logger.warning(
                        "tcp client: bad frame from %s during the handshake: %s", where, exc
                    )
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

    def _install(
        self, sock: Any, decoder: FrameDecoder, handshake: bool, features: frozenset,
        early: List[Message],
    ) -> None:
        """Adopt a fresh connection: interest first, then every unacknowledged message."""
        tls = self.ssl_context is not None
        conn = _Connection(sock, f"{self.host}:{self.port}", self.max_frame_size,
                           self.max_pending_bytes + 1024 * 1024, tls)
        conn.decoder = decoder
        conn.state = _READY
        conn.handshake = handshake
        conn.features = features
        with self._lock:
            frames: List[bytes] = []
            self._removals = []  # the new connection learns the whole interest anyway
            if handshake and self._interest:
                frames.append(_control_frame("$interest", {"add": list(self._interest)}))
            self._ack_mode = "ack" in features
            self._seq = 0
            for item in self._pending:
                self._seq += 1
                item[0] = self._seq
                frames.append(item[1])
            if self._pending:
                self._counts["resent"] += len(self._pending)
            if not self._ack_mode:
                self._pending.clear()
                self._pending_bytes = 0
            if frames:
                with conn.lock:
                    data = b"".join(frames)
                    conn.out.append(data)
                    conn.out_bytes += len(data)
            self._conn = conn
        loop = self._loop
        assert loop is not None
        import selectors

        conn.events = selectors.EVENT_READ
        loop.selector.register(sock, conn.events, conn)
        if early:
            batch: List[Tuple[Tuple[Any, ...], Message]] = []
            for message in early:
                self._deliver(message, batch)
            if batch:
                self._dispatcher.put_many(batch)
        if frames:
            self._kick(conn)

    # -- writing ------------------------------------------------------------------------------

    def _kick(self, conn: _Connection) -> None:
        loop = self._loop
        if loop is None:
            return
        if conn.tls:  # only the I/O thread touches a TLS socket
            if loop.in_loop():
                self._flush(conn)
            elif not conn.scheduled:
                conn.scheduled = True
                loop.call_soon(lambda: self._scheduled_flush(conn))
        elif not conn.blocked:
            if loop.in_loop():
                self._flush(conn)
                return
            decision = conn.defer()
            if decision == _WRITE_NOW:
                self._flush(conn)
            elif decision == _WRITE_SCHEDULE:
                loop.call_soon(lambda: self._scheduled_flush(conn))

    def _scheduled_flush(self, conn: _Connection) -> None:
        conn.scheduled = False
        if self._conn is conn:
            self._flush(conn)

    def _flush(self, conn: _Connection) -> None:
        loop = self._loop
        assert loop is not None
        try:
            done = conn.write()
        except OSError as exc:
            reason = f"write failed: {exc}"
            if loop.in_loop():
                self._lost(conn, reason)
            else:
                loop.call_soon(lambda: self._lost(conn, reason))
            return
        if done is False:
            if loop.in_loop():
                self._update_events(conn)
            else:
                loop.call_soon(lambda: self._update_events(conn))

    def _update_events(self, conn: _Connection) -> None:
        import selectors

        if conn.closed or self._conn is not conn:
            return
        events = 0 if conn.paused else selectors.EVENT_READ
        if conn.blocked:
            events |= selectors.EVENT_WRITE
        if events == conn.events:
            return
        selector = self._loop.selector  # type: ignore[union-attr]
        if conn.events == 0:
            selector.register(conn.sock, events, conn)
        elif events == 0:
            selector.unregister(conn.sock)
        else:
            selector.modify(conn.sock, events, conn)
        conn.events = events

    # -- loop thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        import selectors

        loop = self._loop
        assert loop is not None
        loop.ident = threading.get_ident()
        interval = self.ping_interval
        tick_every = min(0.25, interval / 4) if interval else 0.25
        next_tick = time.monotonic() + tick_every
        try:
            while not self._closing.is_set():
                conn = self._conn
                if conn is None:
                    try:
                        if not self._reconnect():
                            break
                    except Exception:  # a bug: log it, back off, try again
                        logger.exception("tcp client: internal error while reconnecting")
                        if self._closing.wait(self.backoff_max):
                            break
                    continue
                for key, mask in loop.selector.select(max(0.0, next_tick - time.monotonic())):
                    if key.data is None:
                        loop.run_calls(drain=True)
                        continue
                    if key.data is not self._conn:
                        continue
                    try:
                        if mask & selectors.EVENT_WRITE:
                            conn.blocked = False
                            self._flush(conn)
                            if not conn.blocked:
                                self._update_events(conn)
                        if mask & selectors.EVENT_READ and self._conn is conn:
                            self._on_readable(conn)
                    except Exception:
                        logger.exception("tcp client: internal error on %s", conn.peer)
                        self._lost(conn, "internal error (see traceback)")
                loop.run_calls()
                now = time.monotonic()
                if now >= next_tick:
                    next_tick = now + tick_every
                    try:
                        self._tick(now)
                    except Exception:
                        logger.exception("tcp client: internal error in a tick")
        except Exception:  # pragma: no cover - a bug; do not die silently
            logger.exception("tcp client: I/O loop crashed")
        finally:
            self._teardown()

    def _on_readable(self, conn: _Connection) -> None:
        sock = conn.sock
        try:
            data = sock.recv(_RECV_SIZE)
            if conn.tls and data:
                while sock.pending():
                    data += sock.recv(_RECV_SIZE)
        except _would_block_errors(conn.tls):
            return
        except OSError as exc:
            self._lost(conn, f"read failed: {exc}")
            return
        if not data:
            self._lost(conn, "server closed the connection")
            return
        conn.last_recv = time.monotonic()
        conn.ping_sent = False
        try:
            bodies = conn.decoder.feed(data)
        except FrameTooLargeError as exc:
            self._counts["oversize_frames"] += 1
            self._lost(conn, f"server sent an oversize frame: {exc}")
            return
        batch: List[Tuple[Tuple[Any, ...], Message]] = []
        for body in bodies:
            control = _fast_control(body)
            if control is not None:
                self._on_control(conn, control[0], control[1])
                continue
            try:
                message = decode(body)
            except FrameError as exc:
                self._counts["frame_errors"] += 1
                logger.warning("tcp client: rejected a frame from %s: %s", conn.peer, exc)
                continue
            topic = message.topic
            if topic[0] == "$":
                self._on_control(conn, topic, message.payload)
            else:
                self._counts["messages_in"] += 1
                self._deliver(message, batch)
        if batch:
            self._dispatcher.put_many(batch)
            if self._dispatcher.high and not conn.paused:
                conn.paused = True
                self._update_events(conn)

    def _deliver(self, message: Message, batch: List[Tuple[Tuple[Any, ...], Message]]) -> None:
        topic = message.topic
        try:
            subscriptions = _deliver_local(
                self._local, message, taken=topic not in self._receive_topics
            )
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
                    pending = self._pending
                    while pending and 0 < pending[0][0] <= acked:
                        self._pending_bytes -= len(pending.popleft()[1])
                    if self._space_waiters:
                        self._space.notify_all()
        elif topic == "$ping":
            if conn.enqueue(_control_frame("$pong", {})) == _OK:
                self._flush(conn)
        elif topic == "$pong":
            pass
        elif topic == "$error":
            reason = str(payload.get("reason"))[:200]
            logger.warning("tcp client: %s reports: %s", conn.peer, reason)
        else:
            self._counts["protocol_errors"] += 1
            logger.debug("tcp client: ignored control frame %r", topic)

    def _tick(self, now: float) -> None:
        conn = self._conn
        if conn is None:
            return
        interval = self.ping_interval
        if interval and conn.handshake and "ping" in conn.features:
            silent = now - conn.last_recv
            if silent > 2 * interval:
                self._counts["dead_peers"] += 1
                self._lost(conn, f"dead peer: nothing received for {silent:.1f} s")
                return
            if silent > interval and not conn.ping_sent:
                conn.ping_sent = True
                conn.enqueue(_control_frame("$ping", {}))
        if self._removals:
            self._flush_removals(conn)
        if conn.out_bytes and not conn.blocked:
            self._flush(conn)

    def _lost(self, conn: _Connection, reason: str) -> None:
        """The connection broke (loop thread): forget it; _run reconnects."""
        with self._lock:
            if self._conn is not conn:
                return
            self._conn = None
            if self._space_waiters:
                self._space.notify_all()
            for item in self._pending:
                item[0] = 0
        with conn.lock:
            conn.closed = True
            conn.out.clear()
        if conn.events:
            try:
                self._loop.selector.unregister(conn.sock)  # type: ignore[union-attr]
            except (KeyError, ValueError, OSError):
                pass
        try:
            conn.sock.close()
        except OSError:
            pass
        if self._closing.is_set():
            return
        self._counts["disconnects"] += 1
        if self.reconnect:
            logger.warning("tcp client: lost %s (%s); reconnecting", conn.peer, reason)
        else:
            logger.warning("tcp client: lost %s (%s)", conn.peer, reason)
            with self._lock:
                self._failed = f"connection to {conn.peer} lost: {reason}"

    def _reconnect(self) -> bool:
        """Retry with capped exponential backoff and jitter; False to stop the loop."""
        if not self.reconnect or self._closing.is_set():
            return False
        delay = self.backoff_initial
        while not self._closing.is_set():
            jitter = 0.5 + os.urandom(1)[0] / 510.0  # 0.5 .. 1.0
            if self._closing.wait(delay * jitter):
                return False
            self._counts["reconnect_attempts"] += 1
            try:
                opened = self._open(self.connect_timeout)
            except AuthenticationError as exc:
                logger.error("tcp client: reconnect refused: %s", exc)
            except (ConnectionError, OSError, TransportClosedError) as exc:
                logger.debug("tcp client: reconnect failed: %s", exc)
            else:
                if self._closing.is_set():
                    opened[0].close()
                    return False
                self._install(*opened)
                self._counts["reconnects"] += 1
                logger.info("tcp client: reconnected to %s:%s", self.host, self.port)
                return True
            delay = min(delay * 2, self.backoff_max)
        return False

    def _dispatch_low(self) -> None:
        loop = self._loop
        if loop is not None:
            loop.call_soon(self._resume_reading)

    def _resume_reading(self) -> None:
        conn = self._conn
        if conn is not None and conn.paused:
            conn.paused = False
            self._update_events(conn)

    def _teardown(self) -> None:
        """Loop thread exit: flush what is queued (up to 1 s) and close the socket."""
        with self._lock:
            conn = self._conn
            self._conn = None
        if conn is not None:
            with conn.lock:
                chunks = [bytes(conn.cur)] if conn.cur is not None else []
                chunks.extend(conn.out)
                conn.out.clear()
                conn.cur = None
                conn.closed = True
            if chunks:
                try:
                    conn.sock.settimeout(1.0)
                    conn.sock.sendall(b"".join(chunks))
                except OSError:
                    pass
            try:
                conn.sock.close()
            except OSError:
                pass
        loop = self._loop
        if loop is not None:
            loop.close()



# ---------------------------------------------------------------------------
# 6. Queues: MessageQueue and RemoteQueue
# ---------------------------------------------------------------------------

_CO_COROUTINE = 0x80  # inspect.CO_COROUTINE, without importing inspect


def _is_async_callable(func: Any) -> bool:
    code = getattr(getattr(func, "__func__", func), "__code__", None)
    return code is not None and bool(code.co_flags & _CO_COROUTINE)


class MessageQueue:
    """Topic-keyed pub-sub and request-reply over one Transport.

    The default transport is an in-process :class:`MemoryTransport`; pass a
    TCP (or broker) transport to reach other processes with the same API.
    Closing the queue closes its transport.

    A handler that raises never disturbs the publisher or other handlers:
    the error goes to ``on_error(exc, message)`` when given, and is always
    counted in :attr:`stats`; without ``on_error`` it is logged.
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
        with self._lock:
            self._handler_errors += 1
        if self.on_error is not None:
            try:
                self.on_error(exc, message)
                return
            except Exception:
                logger.exception("on_error hook failed while handling an error")
        logger.error(
            "handler %s failed for message %s on %r",
            _callable_name(handler),
            message.id,
            message.topic,
            exc_info=(type(exc), exc, exc.__traceback__),
        )

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
        self, topic: str, payload: Any, headers: Dict[str, Any]
    ) -> Tuple[Message, Inbox]:
        message = _make_message(topic, payload, headers)
        message.reply_to = "_reply." + message.id
        return message, self.transport.open_inbox(message.reply_to)

    def request(
        self, topic: str, payload: Any = None, timeout: Optional[float] = 30.0, **headers: Any
    ) -> Optional[Message]:
        """Publish a request and wait for the reply ``Message``; None on timeout.

        The responder answers with :meth:`reply`.  A reply arriving after the
        timeout is discarded.
        """
        message, inbox = self._prepare_request(topic, payload, headers)
        try:
            self.transport.send(message)
            return inbox.get(timeout)
        finally:
            inbox.close()

    async def request_async(
        self, topic: str, payload: Any = None, timeout: Optional[float] = 30.0, **headers: Any
    ) -> Optional[Message]:
        """Asyncio-native :meth:`request`."""
        message, inbox = self._prepare_request(topic, payload, headers)
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


class RemoteQueue:
    """A push-only switchboard: named peers reached over TCP, plus an optional local queue.

    :meth:`connect` opens and owns a :class:`TCPClientTransport` to each
    peer; :meth:`send` pushes a message to one peer, :meth:`broadcast` to
    all.  A node that also receives passes ``local=`` (typically a
    :class:`MessageQueue` on a started :class:`TCPServerTransport`) and
    subscribes to it with :meth:`subscribe` / :meth:`on`.  There is no way
    to pull from a peer's topics: that direction is request-reply (RPC).

    Every message carries the header ``source_node`` (this node's id) unless
    the caller sets it.  A peer that fails during :meth:`broadcast` does not
    stop the others: the failure is logged, counted in :attr:`stats`, kept
    in :attr:`last_errors` and passed to ``on_error(node_id, exc)`` if given.
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
        self.node_id = node_id
        self.local = local
        self.on_error = on_error
        self._lock = threading.Lock()
        self._peers: Dict[str, TCPClientTransport] = {}
        self.last_errors: Dict[str, BaseException] = {}
        self._counts: Dict[str, int] = collections.defaultdict(int)
        self._closed = False

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

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

        Raises KeyError for an unknown peer, TransportFullError if its link
        buffers too much while reconnecting.
        """
        with self._lock:
            transport = self._peers.get(node_id)
        if transport is None:
            raise KeyError(f"unknown peer {node_id!r}; connected peers: {sorted(self._peers)}")
        message = self._message(topic, payload, headers)
        transport.send(message)
        self._counts["sent"] += 1
        return message.id

    def broadcast(self, topic: str, payload: Any = None, **headers: Any) -> Dict[str, str]:
        """Push the same message to every peer; returns ``{node_id: message_id}``.

        Peers that failed are missing from the result; their errors are in
        :attr:`last_errors` (reset on every call), logged and counted.
        """
        validate_topic(topic)
        with self._lock:
            peers = list(self._peers.items())
        message = self._message(topic, payload, headers)
        sent: Dict[str, str] = {}
        errors: Dict[str, BaseException] = {}
        for node_id, transport in peers:
            try:
                transport.send(message)
            except (EventforgeError, OSError) as exc:
                errors[node_id] = exc
                self._counts["send_failures"] += 1
                logger.warning("remote %s: broadcast of %s to %s failed: %s",
                               self.node_id, message.id, node_id, exc)
                if self.on_error is not None:
                    try:
                        self.on_error(node_id, exc)
                    except Exception:
                        logger.exception("remote %s: on_error hook failed", self.node_id)
            else:
                sent[node_id] = message.id
                self._counts["sent"] += 1
        self.last_errors = errors
        return sent

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
            "sent": self._counts["sent"],
            "send_failures": self._counts["send_failures"],
            "peers": {node: transport.stats for node, transport in peers.items()},
        }

    def close(self) -> None:
        """Close every peer link and the local queue."""
        with self._lock:
            self._closed = True
            peers = list(self._peers.values())
            self._peers.clear()
        for transport in peers:
            transport.close()
        if self.local is not None:
            self.local.close()

    def __enter__(self) -> RemoteQueue:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<RemoteQueue {self.node_id!r} peers={self.peers}>"


# ---------------------------------------------------------------------------
# 7. Execution: Executor
# ---------------------------------------------------------------------------


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


def _demo_in_process(out: Callable[[str], Any]) -> None:
    """Show in-process pub-sub, wildcards and request-reply on a MessageQueue."""
    with MessageQueue() as queue:
        out("== in-process pub-sub (MemoryTransport) ==")

        @queue.on("orders.created")
        def exact(message: Message) -> None:
            out(f"  orders.created   got {message.payload}")

        @queue.on("orders.*")
        def one_segment(message: Message) -> None:
            out(f"  orders.*         got {message.topic}")

        @queue.on("**.failed")
        def any_depth(message: Message) -> None:
            out(f"  **.failed        got {message.topic}")

        queue.publish("orders.created", {"id": 1, "item": "book"})
        queue.publish("orders.payment.failed", {"id": 1})

        out("== request-reply ==")

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
        out(f"  {rounds} requests, {elapsed / rounds * 1e6:.1f} us each")
        stats = queue.transport.stats
        out(f"  left behind: {stats['mailboxes']} mailboxes, {stats['inboxes']} inboxes")


def main(argv: Optional[List[str]] = None) -> int:
    """Run the ``eventforge`` command line; return the process exit status."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="eventforge", description="Message-driven task execution: pub-sub, request-reply, RPC."
    )
    parser.add_argument("--version", action="version", version=f"eventforge {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("demo", help="run the demo (no servers needed)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        _demo_in_process(print)
        return 0
    parser.print_help()
    return 2


# ---------------------------------------------------------------------------
# 13. Import aliases
# ---------------------------------------------------------------------------

# The original shipped a package; these names keep its import paths working.
# Each entry maps an alias module to (target module, runnable entry point or
# None).  An entry point makes ``python -m ALIAS`` call ``target.entry()``.
_ALIASES: Dict[str, Tuple[str, Optional[str]]] = {
    "eventforge.types": ("eventforge", None),
    "eventforge.queue": ("eventforge", None),
    "eventforge.transports": ("eventforge", None),
    "eventforge.transports.base": ("eventforge", None),
    "eventforge.transports.memory": ("eventforge", None),
    "eventforge.transports.tcp": ("eventforge", None),
    "eventforge.remote": ("eventforge", None),
}


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
        module.__doc__ = f"Alias of {self.target!r} kept for the original import paths."
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


if __name__ == "__main__":  # pragma: no cover - ``python -m eventforge``
    # Hand over to the canonically imported module so that classes have one
    # identity (pickling in PROCESS mode and isinstance checks rely on it).
    import eventforge as _canonical

    sys.exit(_canonical.main())
