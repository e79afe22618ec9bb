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
