"""NatsTransport: eventforge pub-sub, request-reply and RPC over core NATS.

``pip install 'eventforge[nats]'`` installs the client (nats-py); this module
imports it only when a NatsTransport is created.  Also importable as
``eventforge.transports.nats``.

Topic mapping (see docs/adapters.md):

* a topic is the NATS subject of the same name (a literal ``>`` segment,
  which NATS would read as a wildcard, travels as ``%3E``); an inbox topic
  holding an eventforge id (``_reply.<id>``) uses the subject
  ``_reply.<process part>.<counter>`` so one subscription per process
  (``_reply.<process part>.*``) takes every reply;
* ``*`` maps to ``*``;
* a trailing ``**`` maps to the parent subject *and* ``parent.>`` (NATS
  ``>`` needs at least one token, ``**`` also matches zero): ``a.**`` is
  subscribed as ``a`` and ``a.>``; a lone ``**`` as ``>``;
* a ``**`` anywhere else maps to the broader ``prefix.>`` (``a.**.z`` ->
  ``a.>``), narrowed locally by the core matcher.

Core NATS is at-most-once.  nats-py reconnects and subscribes again by
itself; messages published meanwhile are buffered by the client (bounded).
RPC servers join a NATS queue group, so several workers serving one
service name share its calls, balanced by the server.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Dict, List, Optional, Tuple

import eventforge as ef

from ._broker import (
    BrokerTransport,
    Route,
    collapse_globstars,
    inbox_parts,
    join_thread,
    require,
)

__all__ = ["NatsTransport", "nats_subject", "nats_subjects", "RPC_QUEUE_GROUP"]

#: Queue group joined by RPCServer subscriptions (one per request subject).
RPC_QUEUE_GROUP = "eventforge-rpc"
_GREATER = "%3E"


def _token(segment: str) -> str:
    return _GREATER if segment == ">" else segment


def nats_subject(topic: str) -> str:
    """The NATS subject that carries messages published on ``topic``."""
    if topic.startswith("_"):
        parts = inbox_parts(topic)
        if parts is not None:
            return f"{parts[0]}{parts[1]}.{parts[2]}"
    if ">" not in topic:
        return topic
    return ".".join(_token(segment) for segment in topic.split("."))


def nats_subjects(pattern: str) -> Tuple[str, ...]:
    """The disjoint NATS subjects that together carry every match of ``pattern``."""
    segments = collapse_globstars(pattern)
    if "**" not in segments:
        return (".".join(_token(s) if s != "*" else "*" for s in segments),)
    first = segments.index("**")
    prefix = ".".join(_token(s) if s != "*" else "*" for s in segments[:first])
    wide = f"{prefix}.>" if prefix else ">"
    if first == len(segments) - 1 and prefix:
        return (prefix, wide)
    return (wide,)


async def _cancel_tasks() -> None:
    import asyncio

    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _loop_of(client: Any) -> Any:
    for name in ("_flusher_task", "_reading_task", "_ping_interval_task"):
        task = getattr(client, name, None)
        if task is not None:
            return task.get_loop()
    raise ValueError("pass loop=: cannot tell which event loop runs this NATS client")


class NatsTransport(BrokerTransport):
    """A Transport over a NATS server (core NATS, no JetStream).

    ``NatsTransport("nats://host:4222")`` starts its own asyncio loop on a
    named thread and connects (ConnectionLostError if no server answers
    within ``connect_timeout``); extra keyword arguments go to
    ``nats.connect``.  ``NatsTransport(client=nc, loop=loop)`` uses a
    connected client whose event loop runs in another thread; it is never
    closed by :meth:`close`.

    ``send`` encodes in the caller's thread and queues; the loop hands the
    queue to the client, which writes in batches (no round trip per
    message).  :meth:`flush` waits until the server has everything.
    Subscriptions are confirmed with a flush before ``subscribe`` returns.
    Subscriber callbacks run on one dispatcher thread, in arrival order.
    RPCServer subscriptions join the queue group :data:`RPC_QUEUE_GROUP`
    (``rpc_queue_group=None`` turns that off); ``subscribe(..., queue=NAME)``
    joins any group.
    """

    kind = "nats"

    def __init__(
        self,
        servers: Any = "nats://localhost:4222",
        *,
        client: Any = None,
        loop: Any = None,
        connect_timeout: float = 5.0,
        max_queue_size: int = 1000,
        max_pending: int = 100_000,
        subscribe_timeout: float = 5.0,
        rpc_queue_group: Optional[str] = RPC_QUEUE_GROUP,
        max_frame_size: int = ef.DEFAULT_MAX_FRAME_SIZE,
        **nats_options: Any,
    ) -> None:
        nats = require("nats", "nats-py", "nats")
        super().__init__(
            max_queue_size=max_queue_size,
            max_pending=max_pending,
            subscribe_timeout=subscribe_timeout,
            max_frame_size=max_frame_size,
        )
        self._nats = nats
        self.servers = servers
        self.address = servers if isinstance(servers, str) else ",".join(servers)
        self.rpc_queue_group = rpc_queue_group
        self._subs: Dict[Route, Any] = {}  # loop thread only
        self._routes_alock: Any = None  # an asyncio.Lock, made in the loop
        self._outbox.where = f"the NATS client of {self.address}"
        self._thread: Optional[threading.Thread] = None
        self._last_error: Optional[BaseException] = None
        self._up = False  # connected once
        self._owns_client = client is None
        if client is not None:
            self._nc = client
            self._aloop = loop if loop is not None else _loop_of(client)
            return
        import asyncio

        self._aloop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._run_loop, name=f"eventforge-nats-io-{self.address}", daemon=True
        )
        self._thread.start()
        options = dict(nats_options)
        options.setdefault("connect_timeout", connect_timeout)
        options.setdefault("max_reconnect_attempts", -1)
        options.setdefault("reconnect_time_wait", 0.5)
        options.setdefault("allow_reconnect", True)
        options.setdefault("disconnected_cb", self._on_disconnected)
        options.setdefault("reconnected_cb", self._on_reconnected)
        options.setdefault("error_cb", self._on_error)
        options.setdefault("name", "eventforge")
        try:
            self._nc = self._call(
                nats.connect(servers, **options), connect_timeout + 2.0
            )
        except BaseException as exc:
            self._stop_loop()
            if isinstance(exc, Exception):
                reason = self._last_error or exc
                raise ef.ConnectionLostError(
                    f"cannot connect to NATS at {self.address}: "
                    f"{str(reason) or type(reason).__name__}"
                ) from exc
            raise
        self._up = True

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("connected" if self.connected else "reconnecting")
        return f"<NatsTransport {self.address} {state}>"

    @property
    def connected(self) -> bool:
        """True while the client is connected to a server."""
        nc = getattr(self, "_nc", None)
        return bool(nc is not None and nc.is_connected)

    # -- the event loop ------------------------------------------------------------------

    def _run_loop(self) -> None:
        import asyncio

        asyncio.set_event_loop(self._aloop)
        try:
            self._aloop.run_forever()
        finally:
            self._aloop.close()

    def _call(self, coro: Any, timeout: Optional[float]) -> Any:
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self._aloop).result(timeout)

    def _stop_loop(self) -> None:
        if self._thread is None:
            return
        try:  # leave no task pending (asyncio would complain at exit)
            self._call(_cancel_tasks(), 5.0)
        except Exception as exc:  # pragma: no cover - best effort
            ef.logger.debug("nats %s: cancelling tasks: %s", self.address, exc)
        self._aloop.call_soon_threadsafe(self._aloop.stop)
        join_thread(self._thread, 5.0)

    async def _on_disconnected(self) -> None:
        if not self._closed:
            self._counts["disconnects"] += 1
            self._log.warning("lost", "nats %s: disconnected; reconnecting", self.address)

    async def _on_reconnected(self) -> None:
        self._counts["reconnects"] += 1
        ef.logger.info("nats %s: reconnected (subscriptions restored)", self.address)

    async def _on_error(self, exc: Exception) -> None:
        self._counts["errors"] += 1
        self._last_error = exc
        if self._up:  # before the first connection, the constructor reports it
            self._log.warning("error", "nats %s: %s", self.address,
                              str(exc) or type(exc).__name__)

    # -- routes ---------------------------------------------------------------------------

    def _topic_route(self, topic: str) -> Route:
        parts = inbox_parts(topic)
        if parts is not None:
            return (f"{parts[0]}{parts[1]}.*", "")
        return (nats_subject(topic), "")

    def _pattern_routes(self, pattern: str, queue: Optional[str]) -> Tuple[Route, ...]:
        if not ef.is_pattern(pattern):
            subject = self._topic_route(pattern)[0]
            return ((subject, queue or ""),)
        return tuple((subject, queue or "") for subject in nats_subjects(pattern))

    def _queue_for(self, topic: str, handler: Any) -> Optional[str]:
        server = getattr(handler, "__self__", None)
        if (
            self.rpc_queue_group
            and isinstance(server, ef.RPCServer)
            and topic == server.request_topic
        ):
            return self.rpc_queue_group
        return None

    def _subscribe_route(self, route: Route) -> None:
        import asyncio

        asyncio.run_coroutine_threadsafe(self._sub(route), self._aloop)

    def _unsubscribe_route(self, route: Route) -> None:
        import asyncio

        asyncio.run_coroutine_threadsafe(self._unsub(route), self._aloop)

    def _route_lock(self) -> Any:
        # Subscribe and unsubscribe coroutines start in the order they were
        # scheduled; the (FIFO) lock keeps them in that order across their
        # awaits, so a quick subscribe-unsubscribe-subscribe of one route can
        # never leave two NATS subscriptions (two copies of each message).
        import asyncio

        if self._routes_alock is None:
            self._routes_alock = asyncio.Lock()
        return self._routes_alock

    def debug_state(self) -> Dict[str, Any]:
        """As :meth:`BrokerTransport.debug_state`, plus ``nats_subscriptions``:
        the (subject, queue group) routes subscribed at the NATS server."""
        state = super().debug_state()
        state["nats_subscriptions"] = self._call(self._held_routes(), 5.0)
        return state

    async def _held_routes(self) -> List[Route]:
        async with self._route_lock():
            return list(self._subs)

    async def _sub(self, route: Route) -> None:
        subject, queue = route

        async def on_message(msg: Any) -> None:
            self._arrive(route, msg.data)
            if not self._low.is_set():
                await self._backpressure()

        async with self._route_lock():
            try:
                if route not in self._subs:
                    self._subs[route] = await self._nc.subscribe(
                        subject, queue=queue, cb=on_message
                    )
                await self._nc.flush(self.subscribe_timeout)
            except Exception as exc:
                self._counts["subscribe_errors"] += 1
                self._log.warning("subscribe", "nats %s: subscribing %r failed: %s",
                                  self.address, subject, str(exc) or type(exc).__name__)
                return
        self._confirmed(route)

    async def _unsub(self, route: Route) -> None:
        async with self._route_lock():
            sub = self._subs.pop(route, None)
            if sub is not None:
                try:
                    await sub.unsubscribe()
                except Exception as exc:  # closed or reconnecting: nothing to withdraw
                    ef.logger.debug("nats %s: unsubscribe: %s", self.address, exc)

    async def _backpressure(self) -> None:
        import asyncio

        # The dispatcher is far behind: stop taking messages from this
        # subscription; nats-py buffers them (its pending limits apply).
        while not self._low.is_set() and not self._closed:
            await asyncio.sleep(0.01)

    # -- publishing ------------------------------------------------------------------------

    def _publish(self, topic: str, body: bytes, urgent: bool) -> None:
        if self._outbox.put((nats_subject(topic), body)):
            self._aloop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._aloop.create_task(self._drain())

    async def _drain(self) -> None:
        publish = self._nc.publish
        while True:
            batch = self._outbox.take()
            if batch is None:
                return
            done = 0
            try:
                for subject, body in batch:
                    await publish(subject, body)
                    done += 1
            except Exception as exc:
                self._counts["dropped_out"] += len(batch) - done
                self._log.warning(
                    "publish", "nats %s: dropped %d message(s): %s",
                    self.address, len(batch) - done, str(exc) or type(exc).__name__,
                )
            self._counts["messages_out"] += done

    def flush(self, timeout: Optional[float] = 10.0) -> bool:
        """Wait until the NATS server has every message sent so far; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._outbox.wait_idle(timeout):
            return False
        remaining = 10.0 if deadline is None else max(0.001, deadline - time.monotonic())
        try:
            self._call(self._nc.flush(remaining), remaining + 1.0)
        except Exception:
            return False
        return True

    # -- lifecycle ---------------------------------------------------------------------------

    def _stop(self) -> None:
        if self.connected:
            self.flush(1.0)
        if self._owns_client:
            try:
                self._call(self._nc.close(), 5.0)
            except Exception as exc:
                ef.logger.debug("nats %s: close: %s", self.address, exc)
            self._stop_loop()
            return
        try:
            self._call(self._unsubscribe_all(), 5.0)
        except Exception as exc:
            ef.logger.debug("nats %s: unsubscribe at close: %s", self.address, exc)

    async def _unsubscribe_all(self) -> None:
        for route in list(self._subs):
            await self._unsub(route)
