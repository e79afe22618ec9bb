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
