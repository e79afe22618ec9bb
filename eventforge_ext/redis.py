"""RedisTransport: eventforge pub-sub and request-reply over Redis PUBLISH/SUBSCRIBE.

``pip install 'eventforge[redis]'`` installs the client (redis-py); this module
imports it only when a RedisTransport is created.  Also importable as
``eventforge.transports.redis``.

Topic mapping (see docs/adapters.md):

* a published topic is the Redis channel of the same name; an inbox topic
  holding an eventforge id (``_reply.<id>``) uses the channel
  ``_reply.<process part>.<counter>`` so one pattern subscription per process
  (``_reply.<process part>.*``) takes every reply;
* a pattern without wildcards is a plain ``SUBSCRIBE``;
* a pattern with wildcards is one ``PSUBSCRIBE`` glob: literal segments are
  escaped, ``*`` becomes ``*`` and ``**`` swallows its neighbouring dot, so
  ``a.**`` -> ``a*`` and ``a.**.z`` -> ``a*.z``.  Redis globs cross dots, so
  the glob lets through a superset; the core matcher narrows it to the
  topics the pattern really matches.

Redis pub/sub is at-most-once: a message published while a subscriber is
disconnected is never delivered to it.  The transport reconnects (capped
exponential backoff) and subscribes everything again.
"""

from __future__ import annotations

import threading
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

__all__ = ["RedisTransport", "redis_channel", "redis_glob"]

_GLOB_SPECIAL = frozenset("*?[]\\")
_WRITE_BATCH = 5000  # most PUBLISH commands in one pipeline round trip


def _escape_glob(segment: str) -> str:
    if not _GLOB_SPECIAL.intersection(segment):
        return segment
    return "".join("\\" + ch if ch in _GLOB_SPECIAL else ch for ch in segment)


def redis_channel(topic: str) -> str:
    """The Redis channel that carries messages published on ``topic``."""
    if topic.startswith("_"):
        parts = inbox_parts(topic)
        if parts is not None:
            return f"{parts[0]}{parts[1]}.{parts[2]}"
    return topic


def redis_glob(pattern: str) -> str:
    """The PSUBSCRIBE glob matching (at least) every topic the pattern matches."""
    segments = collapse_globstars(pattern)
    out: List[str] = []
    for index, segment in enumerate(segments):
        if segment == "**":
            if index == 0:
                out.append("*")  # "**.z" -> "*z": zero segments, or any prefix
                continue
            out.append("*")  # "a.**" -> "a*", "a.**.z" -> "a*.z"
            continue
        if index > 0 and not (index == 1 and segments[0] == "**"):
            out.append(".")
        out.append("*" if segment == "*" else _escape_glob(segment))
    return "".join(out)


class RedisTransport(BrokerTransport):
    """A Transport over a Redis server's pub/sub.

    ``RedisTransport(host, port, db=0)``, ``RedisTransport(url="redis://...")``
    or ``RedisTransport(client=redis.Redis(...))``; extra keyword arguments
    go to ``redis.Redis``.  The constructor connects (ConnectionLostError if
    the server cannot be reached).  A client passed in is used for
    publishing and as the template of the subscriber connection, and is
    never closed by :meth:`close`.

    Publishing never waits for Redis: ``send`` encodes and queues, and a
    writer thread sends whatever has queued up as one pipeline (one round
    trip per batch).  :meth:`flush` waits until Redis has taken everything
    sent so far.  The batch in flight when the connection fails is dropped,
    logged and counted (``dropped_out``; Redis pub/sub is at-most-once);
    later messages wait, up to ``max_pending`` (then ``send`` raises
    TransportFullError), until Redis answers again.

    One I/O thread reads the subscriber connection; subscriber callbacks
    run on one dispatcher thread, in arrival order.  Redis has no queue
    groups: every subscriber of a channel gets every message (so several
    RPC workers on one Redis service name would each run every call; use
    NATS for a worker pool).
    """

    kind = "redis"

    def __init__(
        self,
        host: str = "localhost",
        port: int = 6379,
        *,
        db: int = 0,
        url: Optional[str] = None,
        client: Any = None,
        max_queue_size: int = 1000,
        max_pending: int = 100_000,
        subscribe_timeout: float = 5.0,
        backoff_initial: float = 0.05,
        backoff_max: float = 2.0,
        max_frame_size: int = ef.DEFAULT_MAX_FRAME_SIZE,
        **redis_options: Any,
    ) -> None:
        redis = require("redis", "redis", "redis")
        super().__init__(
            max_queue_size=max_queue_size,
            max_pending=max_pending,
            subscribe_timeout=subscribe_timeout,
            max_frame_size=max_frame_size,
        )
        self._redis = redis
        self._owns_client = client is None
        if client is None:
            redis_options.setdefault("socket_connect_timeout", 5.0)
            if url is not None:
                client = redis.Redis.from_url(url, **redis_options)
            else:
                client = redis.Redis(host=host, port=port, db=db, **redis_options)
        self._client = client
        kwargs = client.connection_pool.connection_kwargs
        self.address = f"{kwargs.get('host', kwargs.get('path', '?'))}:{kwargs.get('port', '')}"
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        # publishing: senders queue, one writer thread pipelines
        self._outbox.where = f"Redis at {self.address}"
        self._writer_wake = threading.Event()
        self._stopping = threading.Event()
        # subscribing: one selector thread owns the subscriber connection
        self._loop = ef._Loop(f"eventforge-redis-io-{self.address}")
        self._conn: Any = None
        self._sock: Any = None  # the socket registered with the selector
        try:
            self._conn = self._new_connection()
        except BaseException:
            self._loop.close()
            if self._owns_client:
                self._client.close()
            raise
        self._connected = True
        self._writer = threading.Thread(
            target=self._write_loop, name=f"eventforge-redis-writer-{self.address}", daemon=True
        )
        self._writer.start()
        self._loop.start(self._run)

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("connected" if self._connected else "reconnecting")
        return f"<RedisTransport {self.address} {state}>"

    # -- routes -------------------------------------------------------------------------

    def _topic_route(self, topic: str) -> Route:
        parts = inbox_parts(topic)
        if parts is not None:
            return ("p", f"{parts[0]}{parts[1]}.*".encode())
        return ("c", topic.encode())

    def _pattern_routes(self, pattern: str, queue: Optional[str]) -> Tuple[Route, ...]:
        if queue is not None:
            raise ValueError("Redis pub/sub has no queue groups; use NatsTransport for them")
        if not ef.is_pattern(pattern):
            return (self._topic_route(pattern),)
        return (("p", redis_glob(pattern).encode()),)

    def _subscribe_route(self, route: Route) -> None:
        kind, name = route
        command = "SUBSCRIBE" if kind == "c" else "PSUBSCRIBE"
        self._loop.call_soon(lambda: self._command(command, name))

    def _unsubscribe_route(self, route: Route) -> None:
        kind, name = route
        command = "UNSUBSCRIBE" if kind == "c" else "PUNSUBSCRIBE"
        self._loop.call_soon(lambda: self._command(command, name))

    # -- publishing ----------------------------------------------------------------------

    def _publish(self, topic: str, body: bytes, urgent: bool) -> None:
        if not self._outbox.put((redis_channel(topic), body)):
            return  # the writer is draining: this goes out in its next pipeline
        if urgent:
            # Nothing was waiting and someone will wait for this one (a request
            # or a reply): send it from this thread, saving the writer hop.
            self._write_inline()
        else:
            self._writer_wake.set()

    def _write_inline(self) -> None:
        for _ in range(3):
            batch = self._outbox.take(_WRITE_BATCH)
            if batch is None:
                return  # all sent; the outbox is idle again
            if not self._write(batch):
                break  # the writer takes over and waits for Redis
        self._writer_wake.set()  # still more: the writer thread's job

    def flush(self, timeout: Optional[float] = 10.0) -> bool:
        """Wait until Redis has taken every message sent so far; False on timeout."""
        if not self._writer.is_alive():
            return not self._outbox
        return self._outbox.wait_idle(timeout)

    def _write_loop(self) -> None:
        while True:
            self._writer_wake.clear()
            batch = self._outbox.take(_WRITE_BATCH)
            if batch is None:
                if self._stopping.is_set():
                    return
                self._writer_wake.wait()
                continue
            if not self._write(batch):
                self._await_broker()

    def _await_broker(self) -> None:
        """After a failed write, wait (backing off) until Redis answers a PING.

        Meanwhile messages sent wait in the outbox (up to ``max_pending``) and
        go out, in order, once Redis is back.
        """
        backoff = self.backoff_initial
        while not self._stopping.wait(backoff):
            try:
                self._client.ping()
            except Exception:
                backoff = min(backoff * 2, self.backoff_max)
            else:
                return

    def _write(self, batch: List[Tuple[str, bytes]]) -> bool:
        pipe = self._client.pipeline(transaction=False)
        command = pipe.execute_command
        for channel, body in batch:
            command("PUBLISH", channel, body)
        try:
            pipe.execute(raise_on_error=False)
        except Exception as exc:  # the connection failed: this batch is lost
            self._counts["dropped_out"] += len(batch)
            self._log.warning(
                "publish", "redis %s: dropped %d message(s) that could not be published: %s",
                self.address, len(batch), exc,
            )
            return False
        finally:
            pipe.reset()
        self._counts["messages_out"] += len(batch)
        return True

    # -- the subscriber connection (I/O thread) ---------------------------------------------

    def _new_connection(self) -> Any:
        pool = self._client.connection_pool
        options: Dict[str, Any] = dict(pool.connection_kwargs)
        options["protocol"] = 2  # pub/sub pushes as plain arrays
        options["decode_responses"] = False  # bodies are bytes, whatever the client decodes
        for key in [key for key in options if key.startswith("maint_notifications")]:
            del options[key]  # redis-py 7+: RESP3-only, meaningless here
        options["socket_timeout"] = None  # reads happen only when the selector says so
        try:
            conn = pool.connection_class(**options)
            conn.connect()
        except Exception as exc:
            raise ef.ConnectionLostError(
                f"cannot connect to Redis at {self.address}: {exc}"
            ) from exc
        return conn

    def _command(self, command: str, name: bytes) -> None:
        conn = self._conn
        if conn is None:
            return  # subscribed on reconnect (the route is still counted)
        try:
            conn.send_command(command, name)
        except Exception as exc:
            self._lost(conn, f"{command} failed: {exc}")

    def _run(self) -> None:
        loop = self._loop
        loop.ident = threading.get_ident()
        selector = loop.selector
        backoff = self.backoff_initial
        try:
            self._adopt(self._conn)
            while not self._stopping.is_set():
                try:
                    if self._conn is None:
                        if not self._reconnect():
                            for key, _ in selector.select(backoff):
                                if key.data is None:
                                    loop.run_calls(drain=True)
                            backoff = min(backoff * 2, self.backoff_max)
                            continue
                        backoff = self.backoff_initial
                    for key, _ in selector.select(1.0):
                        if key.data is None:
                            loop.run_calls(drain=True)
                        elif key.data is self._conn:
                            self._read(key.data)
                    loop.run_calls()
                except Exception as exc:  # a bug, or a surprise from the client
                    ef.logger.exception("redis %s: I/O loop error", self.address)
                    if self._conn is not None:
                        self._lost(self._conn, f"internal error: {exc!r}")
        finally:
            conn = self._conn
            if conn is not None:
                self._lost(conn, "closing")

    def _adopt(self, conn: Any) -> None:
        import selectors

        self._sock = conn._sock
        self._loop.selector.register(self._sock, selectors.EVENT_READ, conn)
        self._conn = conn
        self._connected = True

    def _reconnect(self) -> bool:
        self._counts["reconnect_attempts"] += 1
        try:
            conn = self._new_connection()
        except ef.ConnectionLostError as exc:
            self._log.warning("reconnect", "redis %s: still unreachable: %s", self.address, exc)
            return False
        self._adopt(conn)
        self._counts["reconnects"] += 1
        ef.logger.info("redis %s: reconnected; subscribing again", self.address)
        for route in self._routes_now():
            kind, name = route
            self._command("SUBSCRIBE" if kind == "c" else "PSUBSCRIBE", name)
        return True

    def _lost(self, conn: Any, reason: str) -> None:
        if self._conn is not conn:
            return
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                self._loop.selector.unregister(sock)  # works on a closed socket too
            except (KeyError, ValueError):
                pass
        conn.disconnect()
        self._conn = None
        self._connected = False
        if not self._stopping.is_set():
            self._counts["disconnects"] += 1
            self._log.warning("lost", "redis %s: connection lost (%s); reconnecting",
                              self.address, reason)

    def _read(self, conn: Any) -> None:
        try:
            while True:
                self._on_push(conn.read_response())
                if self._conn is not conn or not conn.can_read(timeout=0):
                    return
        except Exception as exc:
            self._lost(conn, str(exc) or type(exc).__name__)

    def _on_push(self, push: Any) -> None:
        if not isinstance(push, list) or not push:
            return
        kind = push[0]
        if kind == b"pmessage":
            self._arrive(("p", push[1]), push[3])
        elif kind == b"message":
            self._arrive(("c", push[1]), push[2])
        elif kind == b"subscribe":
            self._confirmed(("c", push[1]))
            return
        elif kind == b"psubscribe":
            self._confirmed(("p", push[1]))
            return
        else:
            return
        while not self._low.is_set() and not self._stopping.is_set():
            self._wait_dispatch(0.5)  # backpressure: Redis buffers meanwhile

    # -- lifecycle ----------------------------------------------------------------------

    def _stop(self) -> None:
        self.flush(1.0)
        self._stopping.set()
        self._writer_wake.set()
        self._loop.wake()
        join_thread(self._writer, 5.0)
        join_thread(self._loop.thread, 5.0)
        self._loop.close()
        left = self._outbox.clear()
        if left:
            ef.logger.warning("redis %s: closed with %d message(s) not published",
                              self.address, left)
        if self._owns_client:
            self._client.close()


# The Redis Streams work store lives in its own module; importing it here on
# first use keeps ``from eventforge_ext.redis import RedisWorkQueue`` working.
_WORK_QUEUE_NAMES = frozenset({"RedisWorkStore", "RedisWorkQueue", "RedisVersionError"})


def __getattr__(name: str) -> Any:
    if name in _WORK_QUEUE_NAMES:
        from . import redis_streams

        return getattr(redis_streams, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
