"""What the broker transports (Redis, NATS) share: routes, local delivery, inboxes.

A broker transport keeps a core :class:`~eventforge.MemoryTransport` as its
local side: subscriptions, mailboxes, blocked receivers and request inboxes
live there and follow the core's rules exactly.  What is added here is the
bookkeeping between eventforge patterns and *routes*, the broker
subscriptions (a Redis channel or glob, a NATS subject with its queue group):

* each distinct route is subscribed on the broker once, however many local
  subscriptions need it (reference counts), and confirmed before
  ``subscribe()`` returns while the broker is reachable;
* a message arriving through route R runs exactly the local subscriptions
  whose pattern maps to R *and* whose pattern matches the message's topic
  (the core's matcher narrows what a broader broker pattern let through).
  The routes of one pattern never overlap, so a subscription sees each
  message once even when several of its broker patterns, or other
  subscriptions' patterns, match the same topic;
* exact-topic interest (``receive`` and request inboxes) has one route per
  topic; only a copy arriving on that route reaches the mailbox or inbox;
* subscriber callbacks run on one dispatcher thread (the core's), in arrival
  order, so a handler may block, even on a request over this transport.

Request inboxes of eventforge's own request ids (``_reply.<id>``,
``_rpc_reply.<id>``) travel on a broker name that carries the id's
per-process part as its own segment, so one broker subscription per process
receives every reply (the ``_INBOX.<nuid>.*`` idea of NATS clients): a
request costs no extra broker round trip.
"""

from __future__ import annotations

import collections
import importlib
import logging
import re
import threading
import time
from typing import Any, Callable, Deque, Dict, Iterable, List, Optional, Tuple

import eventforge as ef

logger = logging.getLogger("eventforge")

Route = Tuple[Any, ...]  # a broker subscription: (kind, name) or (subject, queue)
Message = ef.Message

# eventforge ids: 8-4-4-4 hex (fixed per process), then a hex counter.
_ID_RE = re.compile(r"([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4})-([0-9a-f]{12,})\Z")
_INBOXES = ef.INBOX_PREFIXES
_LOG_EVERY = 10.0  # at most one log line per kind of problem per this many seconds
# Counters always present in a broker transport's stats.
_COUNTERS = (
    "messages_in", "messages_out", "dropped_out", "frame_errors", "mailbox_full",
    "disconnects", "reconnects", "reconnect_attempts", "unconfirmed_subscriptions",
    "subscribe_errors", "errors",
)


def require(module: str, package: str, extra: str) -> Any:
    """Import ``module`` or raise ImportError naming the extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"this eventforge adapter needs the {package!r} package: "
            f"pip install 'eventforge[{extra}]'"
        ) from exc


def inbox_parts(topic: str) -> Optional[Tuple[str, str, str]]:
    """``(prefix, process_part, counter)`` of an inbox topic holding an eventforge id.

    ``"_reply.0a1b2c3d-0a1b-4c2d-8e3f-00000000002a"`` gives
    ``("_reply.", "0a1b2c3d-0a1b-4c2d-8e3f", "00000000002a")``; any other
    topic gives None.
    """
    for prefix in ef.INBOX_PREFIXES:
        if topic.startswith(prefix):
            found = _ID_RE.match(topic, len(prefix))
            if found is not None:
                return prefix, found.group(1), found.group(2)
            return None
    return None


def collapse_globstars(pattern: str) -> List[str]:
    """The segments of ``pattern`` with runs of ``**`` folded into one (same meaning)."""
    segments: List[str] = []
    for segment in pattern.split("."):
        if segment == "**" and segments and segments[-1] == "**":
            continue
        segments.append(segment)
    return segments


class _RateLimitedLog:
    """Log one line per key at most every ``_LOG_EVERY`` seconds."""

    def __init__(self) -> None:
        self._last: Dict[str, float] = {}

    def warning(self, key: str, text: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -_LOG_EVERY) >= _LOG_EVERY:
            self._last[key] = now
            logger.warning(text, *args)


class Outbox:
    """Messages waiting for the broker, in send order, drained by one party at a time.

    :meth:`put` tells the caller when it must start the drainer (a thread or
    an event-loop task); the drainer takes batches with :meth:`take` until it
    gets None, which also marks the outbox idle for :meth:`wait_idle`.
    """

    def __init__(self, limit: int, where: str) -> None:
        if type(limit) is not int or limit < 1:
            raise ValueError(f"max_pending must be a positive int, not {limit!r}")
        self.limit = limit
        self.where = where
        self.full = 0
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._items: Deque[Tuple[str, bytes]] = collections.deque()
        self._busy = False

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: Tuple[str, bytes]) -> bool:
        """Queue ``item``; True when no drainer runs and the caller must start one."""
        with self._lock:
            if len(self._items) >= self.limit:
                self.full += 1
                raise ef.TransportFullError(
                    f"{self.limit} messages wait for {self.where}; it is unreachable "
                    "or slower than the publisher"
                )
            self._items.append(item)
            if self._busy:
                return False
            self._busy = True
            return True

    def take(self, most: int = 0) -> Optional[List[Tuple[str, bytes]]]:
        """The next batch (all, or at most ``most``), or None once empty (now idle)."""
        with self._lock:
            items = self._items
            if not items:
                self._busy = False
                self._idle.notify_all()
                return None
            self._busy = True
            if not most or len(items) <= most:
                batch = list(items)
                items.clear()
                return batch
            return [items.popleft() for _ in range(most)]

    def wait_idle(self, timeout: Optional[float]) -> bool:
        """Wait until everything queued was handed over; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._busy or self._items:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._idle.wait(remaining)
        return True

    def clear(self) -> int:
        """Drop what waits; returns how many."""
        with self._lock:
            left = len(self._items)
            self._items.clear()
            return left


class BrokerTransport(ef.Transport):
    """Base of :class:`RedisTransport` and :class:`NatsTransport` (see module doc).

    Subclasses provide the broker side: :meth:`_pattern_routes`,
    :meth:`_topic_route`, :meth:`_subscribe_route`,
    :meth:`_unsubscribe_route`, :meth:`_publish` and :meth:`_stop`; and they
    call :meth:`_arrive` for every message the broker delivers and
    :meth:`_confirmed` when the broker confirmed a route.
    """

    kind = "broker"

    def __init__(
        self,
        *,
        max_queue_size: int = 1000,
        max_pending: int = 100_000,
        subscribe_timeout: float = 5.0,
        max_frame_size: int = ef.DEFAULT_MAX_FRAME_SIZE,
    ) -> None:
        self.subscribe_timeout = subscribe_timeout
        self.max_pending = max_pending
        self._outbox = Outbox(max_pending, f"the {self.kind} broker")
        self.max_frame_size = max_frame_size
        self._local = ef.MemoryTransport(max_queue_size)
        # _routes_lock orders reference counts *and* the broker commands they
        # trigger, so a subscribe racing an unsubscribe of the same route
        # reaches the broker in the order the counts changed.
        self._routes_lock = threading.Lock()
        self._refs: Dict[Route, int] = {}
        self._ready: Dict[Route, threading.Event] = {}
        self._sub_routes: Dict[str, Tuple[Route, ...]] = {}
        self._exact: Dict[str, Route] = {}  # receive topics and open inboxes -> their route
        self._receive_topics: Dict[str, None] = {}
        self._kept_routes: Dict[Route, None] = {}  # shared reply routes: kept until close
        self._dispatcher = ef._Dispatcher(
            f"eventforge-{self.kind}-dispatch", self._local, self._dispatch_low
        )
        self._low = threading.Event()
        self._low.set()
        # One writer at a time per counter (the I/O thread, or whoever drains
        # the outbox), but for unconfirmed_subscriptions: under _routes_lock.
        self._counts: Dict[str, int] = collections.defaultdict(int)
        self._counts.update(dict.fromkeys(_COUNTERS, 0))
        self._log = _RateLimitedLog()
        self._closed = False
        self._connected = False

    # -- what a broker provides -----------------------------------------------------

    def _pattern_routes(self, pattern: str, queue: Optional[str]) -> Tuple[Route, ...]:
        """The non-overlapping routes that together carry every match of ``pattern``."""
        raise NotImplementedError

    def _topic_route(self, topic: str) -> Route:
        """The route on which messages to the exact ``topic`` arrive."""
        raise NotImplementedError

    def _subscribe_route(self, route: Route) -> None:
        """Ask the broker for ``route`` (must not block on the broker's answer)."""
        raise NotImplementedError

    def _unsubscribe_route(self, route: Route) -> None:
        """Withdraw ``route`` from the broker (must not block)."""
        raise NotImplementedError

    def _publish(self, topic: str, body: bytes, urgent: bool) -> None:
        """Queue ``body`` for the broker under ``topic``'s broker name.

        ``urgent``: someone will wait for this message (a request or a reply).
        """
        raise NotImplementedError

    def _stop(self) -> None:
        """Flush what is queued (briefly), stop the broker threads, release the client."""
        raise NotImplementedError

    # -- Transport API ------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    @property
    def connected(self) -> bool:
        """True while the connection to the broker is up."""
        return self._connected

    def _check_open(self) -> None:
        if self._closed:
            raise ef.TransportClosedError(f"{type(self).__name__} is closed")

    def send(self, message: ef.Message) -> None:
        """Publish ``message`` through the broker; no round trip, no subscriber needed.

        The message is encoded (eventforge's JSON wire format) in the
        caller's thread, so an unserializable payload raises here, before
        anything is queued.
        """
        topic = ef.validate_topic(message.topic)
        self._check_open()
        body = ef.encode(message, max_frame_size=self.max_frame_size)[4:]
        self._publish(topic, body, message.reply_to is not None or topic.startswith(_INBOXES))

    def receive(self, topic: str, timeout: Optional[float] = None) -> Optional[Message]:
        """Take the next message on the exact ``topic``.

        The first call subscribes ``topic`` on the broker for good; from then
        on its messages wait here (the core mailbox rules: at most
        ``max_queue_size``) until received.  The broker keeps nothing for a
        topic nobody subscribed to, so messages published before that first
        call are not seen.
        """
        self._want_receive(topic)
        if timeout is None or timeout > 0:
            # A callback waiting here must not hold up the callbacks behind it.
            self._dispatcher.hand_off_if_current()
        return self._local.receive(topic, timeout)

    async def receive_async(
        self, topic: str, timeout: Optional[float] = None
    ) -> Optional[Message]:
        """Asyncio-native :meth:`receive`."""
        import asyncio

        if topic not in self._receive_topics:
            await asyncio.get_running_loop().run_in_executor(None, self._want_receive, topic)
        return await self._local.receive_async(topic, timeout)

    def subscribe(
        self, topic: str, callback: Callable[[Message], Any], *, queue: Optional[str] = None
    ) -> str:
        """Call ``callback`` (on the dispatcher thread) for messages matching ``topic``.

        ``queue`` (NATS only) joins a queue group: the broker hands each
        message to one member of the group.
        """
        ef.validate_pattern(topic)
        return self._subscribed(topic, queue, self._local.subscribe(topic, callback))

    def subscribe_handler(
        self,
        topic: str,
        handler: Callable[[Message], Any],
        on_error: Callable[[Any, Message, BaseException], Any],
    ) -> str:
        """Subscribe ``handler``, routing its exceptions to ``on_error``."""
        ef.validate_pattern(topic)
        queue = self._queue_for(topic, handler)
        sub_id = self._local.subscribe_handler(topic, handler, on_error)
        return self._subscribed(topic, queue, sub_id)

    def _queue_for(self, topic: str, handler: Any) -> Optional[str]:
        """The queue group a MessageQueue subscription joins (none by default)."""
        return None

    def _subscribed(self, topic: str, queue: Optional[str], sub_id: str) -> str:
        try:
            routes = self._pattern_routes(topic, queue)
            self._acquire(routes)
        except BaseException:
            self._local.unsubscribe(sub_id)
            raise
        self._sub_routes[sub_id] = routes
        return sub_id

    def unsubscribe(self, subscription_id: str) -> bool:
        """Remove a subscription (and its broker subscription if it was the last user)."""
        if not self._local.unsubscribe(subscription_id):
            return False
        routes = self._sub_routes.pop(subscription_id, ())
        self._release(routes)
        return True

    def open_inbox(self, topic: str) -> ef.Inbox:
        """Open a request inbox on ``topic``; its broker subscription is in place on return."""
        ef._refuse_receive_pattern(topic)
        ef.validate_topic(topic)
        self._check_open()
        route = self._topic_route(topic)
        shared = inbox_parts(topic) is not None
        if shared:
            if route not in self._kept_routes:
                with self._routes_lock:
                    fresh = route not in self._kept_routes
                    self._kept_routes[route] = None
                if fresh:
                    self._acquire((route,))
        else:
            self._acquire((route,))

        def on_close(closing: ef.Inbox) -> None:
            if topic not in self._receive_topics:
                self._exact.pop(topic, None)
            if not shared:
                self._release((route,))

        try:
            inbox = self._local._open_inbox(topic, ef.Inbox, on_close)
        except BaseException:
            if not shared:
                self._release((route,))
            raise
        # A callback making a request will wait for the reply, which may have
        # to pass through another callback of this transport: the queue moves
        # on to a new dispatcher thread meanwhile (as on TCPClientTransport).
        self._dispatcher.hand_off_if_current()
        self._exact[topic] = route
        return inbox

    def close(self) -> None:
        """Publish what is queued (briefly), stop every thread, drop local state.

        A client passed in by the caller is left open.
        """
        if self._closed:
            return
        self._closed = True
        self._low.set()
        try:
            self._stop()
        finally:
            self._dispatcher.stop(1.0)
            self._local.close()

    @property
    def stats(self) -> Dict[str, Any]:
        """Local delivery counters plus broker counters."""
        stats: Dict[str, Any] = dict(self._local.stats)
        stats.update(self._counts)
        stats["connected"] = self.connected
        stats["routes"] = len(self._refs)
        stats["pending"] = len(self._outbox)
        stats["full"] = self._outbox.full
        stats["dispatch_backlog"] = self._dispatcher.backlog
        return stats

    def debug_state(self) -> Dict[str, Any]:
        """A snapshot of the routing state, for tests and diagnostics only.

        ``routes``: every broker route some subscription, receive topic or
        inbox holds, with its reference count; ``subscription_routes``: the
        routes each subscription id uses.  Its shape may change between
        versions; use :attr:`stats` for monitoring.
        """
        with self._routes_lock:
            return {
                "routes": dict(self._refs),
                "subscription_routes": dict(self._sub_routes),
            }

    # -- routes ---------------------------------------------------------------------

    def _want_receive(self, topic: str) -> None:
        ef._refuse_receive_pattern(topic)
        ef.validate_topic(topic)
        self._check_open()
        if topic in self._receive_topics:
            return
        with self._routes_lock:
            fresh = topic not in self._receive_topics
            self._receive_topics[topic] = None
        if fresh:
            route = self._topic_route(topic)
            self._exact[topic] = route
            self._acquire((route,))

    def _acquire(self, routes: Iterable[Route]) -> None:
        waits: List[threading.Event] = []
        with self._routes_lock:
            self._check_open()
            for route in routes:
                count = self._refs.get(route, 0)
                self._refs[route] = count + 1
                if count == 0:
                    self._ready[route] = threading.Event()
                    self._subscribe_route(route)
                waits.append(self._ready[route])
        if not self.connected:
            return  # subscribed (and confirmed) once the broker is back
        deadline = time.monotonic() + self.subscribe_timeout
        for event in waits:
            if not event.wait(max(0.0, deadline - time.monotonic())) and self.connected:
                with self._routes_lock:  # subscribers on any thread count here
                    self._counts["unconfirmed_subscriptions"] += 1
                self._log.warning(
                    "unconfirmed", "%s: the broker did not confirm a subscription within %s s",
                    self.kind, self.subscribe_timeout,
                )
                return

    def _release(self, routes: Iterable[Route]) -> None:
        with self._routes_lock:
            for route in routes:
                count = self._refs.get(route, 0)
                if count > 1:
                    self._refs[route] = count - 1
                elif count == 1:
                    del self._refs[route]
                    self._ready.pop(route, None)
                    if not self._closed:
                        self._unsubscribe_route(route)

    def _confirmed(self, route: Route) -> None:
        """The broker confirmed ``route``: wake whoever waits in :meth:`_acquire`."""
        event = self._ready.get(route)
        if event is not None:
            event.set()

    def _routes_now(self) -> List[Route]:
        """Every route to (re)subscribe, for a fresh connection."""
        with self._routes_lock:
            return list(self._refs)

    # -- arrivals -------------------------------------------------------------------------

    def _arrive(self, route: Route, body: Any) -> None:
        """Deliver one broker message that came in through ``route``."""
        try:
            message = ef.decode(body)
        except (ValueError, TypeError) as exc:
            self._counts["frame_errors"] += 1
            self._log.warning(
                "frame", "%s: ignored a message that is not an eventforge message: %s",
                self.kind, exc,
            )
            return
        self._counts["messages_in"] += 1
        topic = message.topic
        local = self._local
        try:
            if self._exact.get(topic) == route:
                subscriptions = local._deliver(message, taken=False)
            else:
                subscriptions = local._match(topic)
        except ef.TransportFullError as exc:
            self._counts["mailbox_full"] += 1
            self._log.warning("full", "%s: dropped %s: %s", self.kind, message.id, exc)
            return
        except ef.TransportClosedError:
            return
        if subscriptions:
            sub_routes = self._sub_routes
            mine = tuple(s for s in subscriptions if route in sub_routes.get(s.id, ()))
            if mine:
                self._dispatcher.put_many([(mine, message)])
                if self._dispatcher.high:
                    self._low.clear()

    def _dispatch_low(self) -> None:
        self._low.set()

    def _wait_dispatch(self, timeout: float = 0.5) -> bool:
        """Block the reading thread while the dispatcher is far behind."""
        return self._low.wait(timeout)


def join_thread(thread: Optional[threading.Thread], timeout: float) -> None:
    """Join ``thread`` unless it is the current one (close() from a callback)."""
    if thread is not None and thread is not threading.current_thread():
        thread.join(timeout)
