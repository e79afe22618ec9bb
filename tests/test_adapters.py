"""RedisTransport and NatsTransport against real redis-server / nats-server.

Every test here runs on both adapters (``broker`` is parametrized) unless its
name says which.  The brokers come from tests/_servers.py: the session servers
for ordinary tests, a private server for the ones that restart or pause it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Dict, List

import pytest
from _core_helpers import wait_for as _wait_for
from _servers import require_module, unique_name

import eventforge as ef

require_module("redis")
require_module("nats")

from eventforge_ext.nats import RPC_QUEUE_GROUP, NatsTransport  # noqa: E402
from eventforge_ext.redis import RedisTransport  # noqa: E402

PATIENCE = 15.0  # generous: the machine is shared


def wait_for(condition: Callable[[], Any], timeout: float = PATIENCE,
             what: str = "condition") -> Any:
    return _wait_for(condition, timeout, what)  # brokers get this file's PATIENCE


class Brokers:
    """Makes transports of one kind against one server; closes them all."""

    def __init__(self, kind: str, url: str) -> None:
        self.kind = kind
        self.url = url
        self.owned: List[Any] = []

    def transport(self, url: str = "", **options: Any) -> Any:
        url = url or self.url
        if self.kind == "redis":
            transport = RedisTransport(url=url, **options)
        else:
            transport = NatsTransport(url, **options)
        self.owned.append(transport)
        return transport

    def close(self) -> None:
        for transport in reversed(self.owned):
            transport.close()


@pytest.fixture(params=["redis", "nats"])
def broker(request, no_leaks):
    url = request.getfixturevalue(f"{request.param}_url")
    factory = Brokers(request.param, url)
    yield factory
    factory.close()


@pytest.fixture(params=["redis", "nats"])
def private_broker(request, no_leaks):
    """(factory, server): a private server this test may stop, pause or restart."""
    server = request.getfixturevalue(f"{request.param}_server")
    factory = Brokers(request.param, server.url)
    yield factory, server
    factory.close()


def collector() -> tuple:
    got: List[ef.Message] = []
    lock = threading.Lock()

    def handler(message: ef.Message) -> None:
        with lock:
            got.append(message)

    return got, handler


# -- the Transport contract ----------------------------------------------------------------


def test_publish_without_subscribers_just_works(broker):
    transport = broker.transport()
    for i in range(10):
        transport.send(ef.Message(topic=f"{unique_name()}.nobody", payload=i))
    assert transport.flush(PATIENCE)


def test_unserializable_payload_fails_at_send(broker):
    transport = broker.transport()
    with pytest.raises(TypeError):
        transport.send(ef.Message(topic="x", payload=object()))
    with pytest.raises(ValueError):
        transport.send(ef.Message(topic="bad topic", payload=1))


def test_overlapping_subscriptions_get_each_message_exactly_once(broker):
    base = unique_name()
    sub_side, pub_side = broker.transport(), broker.transport()
    patterns = ["**", f"{base}.**", f"{base}.*", f"{base}.a", f"{base}.**", f"{base}.*.c",
                f"{base}.**.c", "*.a.**"]
    received: Dict[int, List[str]] = collections.defaultdict(list)
    for index, pattern in enumerate(patterns):
        sub_side.subscribe(pattern, lambda m, i=index: received[i].append(m.topic))
    topics = [base, f"{base}.a", f"{base}.a.c", f"{base}.b.c", f"{base}.a.b.c", f"{base}x.a"]
    for topic in topics:
        pub_side.send(ef.Message(topic=topic, payload=None))
    expected = {i: sorted(t for t in topics if ef.topic_matches(p, t))
                for i, p in enumerate(patterns)}
    total = sum(len(v) for v in expected.values())
    wait_for(lambda: sum(len(v) for v in received.values()) >= total, what="deliveries")
    time.sleep(0.3)  # a duplicate would show up now
    assert {i: sorted(received[i]) for i in expected} == expected


@pytest.mark.parametrize("pattern_kind", ["one", "star", "globstar"])
def test_per_subscription_order(broker, pattern_kind):
    base = unique_name()
    pattern = {"one": f"{base}.x", "star": f"{base}.*", "globstar": f"{base}.**"}[pattern_kind]
    sub_side, pub_side = broker.transport(), broker.transport()
    got, handler = collector()
    sub_side.subscribe(pattern, handler)
    for i in range(300):
        pub_side.send(ef.Message(topic=f"{base}.x", payload=i))
    wait_for(lambda: len(got) >= 300, what="300 messages")
    assert [m.payload for m in got] == list(range(300))


def test_subscription_churn_leaves_one_broker_subscription(broker):
    base = unique_name()
    transport, publisher = broker.transport(), broker.transport()
    for pattern in (f"{base}.*", f"{base}.**", f"{base}.x"):
        for _ in range(20):
            transport.unsubscribe(transport.subscribe(pattern, print))
    got, handler = collector()
    for pattern in (f"{base}.*", f"{base}.**", f"{base}.x"):
        transport.subscribe(pattern, handler)
    publisher.send(ef.Message(topic=f"{base}.x", payload=1))
    wait_for(lambda: len(got) >= 3, what="three deliveries")
    time.sleep(0.3)  # a second broker subscription would deliver copies now
    assert len(got) == 3
    held = transport.debug_state()["subscription_routes"]
    assert transport.stats["routes"] == len({r for routes in held.values() for r in routes})


def test_message_fields_survive_the_broker(broker):
    base = unique_name()
    transport = broker.transport()
    got, handler = collector()
    transport.subscribe(f"{base}.*", handler)
    sent = ef.Message(topic=f"{base}.f", payload={"n": [1, 2.5, "x", None]},
                      headers={"h": "v"}, correlation_id="c1", reply_to="r.1")
    transport.send(sent)
    wait_for(lambda: got, what="the message")
    assert got[0] == sent


def test_unsubscribe_stops_delivery_and_keeps_other_subscribers(broker):
    base = unique_name()
    transport = broker.transport()
    first, on_first = collector()
    second, on_second = collector()
    sub = transport.subscribe(f"{base}.*", on_first)
    transport.subscribe(f"{base}.*", on_second)
    assert transport.unsubscribe(sub) is True
    assert transport.unsubscribe(sub) is False
    transport.send(ef.Message(topic=f"{base}.x", payload=1))
    wait_for(lambda: second, what="the remaining subscriber")
    time.sleep(0.2)
    assert first == []


def test_receive_follows_the_mailbox_rules(broker):
    topic = f"{unique_name()}.inbox"
    receiver, sender = broker.transport(), broker.transport()
    assert receiver.receive(topic, timeout=0) is None  # registers the interest
    for i in range(3):
        sender.send(ef.Message(topic=topic, payload=i))
    assert [receiver.receive(topic, timeout=PATIENCE).payload for _ in range(3)] == [0, 1, 2]
    started = time.monotonic()
    assert receiver.receive(topic, timeout=0.2) is None
    assert time.monotonic() - started >= 0.19
    with pytest.raises(ValueError):
        receiver.receive(f"{topic}.*", timeout=0)


def test_receive_async(broker):
    topic = f"{unique_name()}.async"
    receiver, sender = broker.transport(), broker.transport()

    async def main() -> Any:
        assert await receiver.receive_async(topic, timeout=0) is None  # the interest
        waiting = asyncio.ensure_future(receiver.receive_async(topic, timeout=PATIENCE))
        await asyncio.sleep(0.05)
        sender.send(ef.Message(topic=topic, payload="hi"))
        return await waiting

    message = asyncio.run(main())
    assert message is not None and message.payload == "hi"


def test_request_reply_across_transports(broker):
    service = f"{unique_name()}.svc"
    server_side = ef.MessageQueue(broker.transport())
    server_side.subscribe(service, lambda m: server_side.reply(m, m.payload * 2))
    for _ in range(3):  # fresh requesters: the first request sets up the reply route
        client = ef.MessageQueue(broker.transport())
        replies = [client.request(service, i, timeout=PATIENCE) for i in range(5)]
        assert [r.payload for r in replies] == [0, 2, 4, 6, 8]


def test_a_callback_request_answered_by_another_subscriber_of_the_same_transport(broker):
    # A request made from inside a subscriber callback, answered by another
    # subscriber of the very same transport (whose callbacks share a dispatcher).
    service = f"{unique_name()}.inner"
    trigger = f"{unique_name()}.outer"
    queue = ef.MessageQueue(broker.transport())
    queue.subscribe(service, lambda m: queue.reply(m, m.payload + 1))
    answers: List[Any] = []

    def outer(message: ef.Message) -> None:
        reply = queue.request(service, message.payload, timeout=PATIENCE)
        answers.append(None if reply is None else reply.payload)

    queue.subscribe(trigger, outer)
    queue.transport.flush(PATIENCE)
    started = time.monotonic()
    queue.publish(trigger, 41)
    wait_for(lambda: answers, what="the nested request's answer")
    assert answers == [42]
    assert time.monotonic() - started < PATIENCE / 2  # answered, not timed out


def test_request_times_out_and_a_late_reply_is_dropped(broker):
    service = f"{unique_name()}.slow"
    server_side = ef.MessageQueue(broker.transport())
    release = threading.Event()

    def slow(message: ef.Message) -> None:
        release.wait(PATIENCE)
        server_side.reply(message, "late")

    server_side.subscribe(service, slow)
    client = ef.MessageQueue(broker.transport())
    assert client.request(service, None, timeout=0.3) is None
    release.set()
    time.sleep(0.3)
    stats = client.transport.stats
    assert stats["inboxes"] == 0 and stats["buffered"] == 0


def test_a_second_inbox_on_one_topic_is_refused_without_leaking_a_route(broker):
    transport = broker.transport()
    topic = f"_reply.{unique_name()}"  # not an eventforge id: a route of its own
    inbox = transport.open_inbox(topic)
    routes = transport.stats["routes"]
    with pytest.raises(ValueError):
        transport.open_inbox(topic)
    assert transport.stats["routes"] == routes
    inbox.close()
    assert transport.stats["routes"] == routes - 1


def test_rpc_server_and_client(broker):
    service = unique_name()
    server = ef.RPCServer(ef.MessageQueue(broker.transport()), service_name=service)
    server.add_method("add", lambda a, b: a + b)

    def boom() -> None:
        raise ValueError("boom")

    server.add_method("boom", boom)
    server.serve(blocking=False)
    client = ef.RPCClient(ef.MessageQueue(broker.transport()), service, timeout=PATIENCE)
    assert client.add(2, 3) == 5
    with pytest.raises(ef.RemoteError) as info:
        client.boom()
    assert str(info.value) == "ValueError: boom"
    with pytest.raises(ef.MethodNotFoundError):
        client.call("missing")
    server.stop()


def test_inbox_topics_are_private(broker):
    service = f"{unique_name()}.svc"
    spy_side = broker.transport()
    seen, spy = collector()
    spy_side.subscribe("**", spy)
    spy_side.subscribe("_reply.*", spy)
    spy_side.subscribe("_rpc_reply.**", spy)
    server_side = ef.MessageQueue(broker.transport())
    server_side.subscribe(service, lambda m: server_side.reply(m, "pong"))
    client = ef.MessageQueue(broker.transport())
    assert client.request(service, "ping", timeout=PATIENCE).payload == "pong"
    wait_for(lambda: any(m.topic == service for m in seen), what="the request")
    time.sleep(0.2)
    assert [m.topic for m in seen if m.topic.startswith(ef.INBOX_PREFIXES)] == []


def test_handler_errors_are_visible_and_do_not_stop_delivery(broker, caplog):
    base = unique_name()
    transport = broker.transport()
    got, handler = collector()

    def broken(message: ef.Message) -> None:
        raise ValueError(f"broken by {message.payload}")

    transport.subscribe(f"{base}.*", broken)
    transport.subscribe(f"{base}.*", handler)
    errors: List[BaseException] = []
    queue = ef.MessageQueue(transport, on_error=lambda exc, m: errors.append(exc))
    queue.subscribe(f"{base}.*", broken)
    with caplog.at_level(logging.ERROR, logger="eventforge"):
        for i in range(3):
            transport.send(ef.Message(topic=f"{base}.x", payload=i))
        wait_for(lambda: len(got) == 3 and len(errors) == 3, what="deliveries")
        wait_for(lambda: transport.stats["handler_errors"] >= 3, what="the count")
    assert "broken by 0" in caplog.text
    assert [str(e) for e in errors] == ["broken by 0", "broken by 1", "broken by 2"]


@pytest.mark.parametrize("error", [SystemExit, KeyboardInterrupt, GeneratorExit])
def test_dispatch_survives_base_exceptions(broker, error):
    base = unique_name()
    transport = broker.transport()
    got, handler = collector()

    def hostile(message: ef.Message) -> None:
        raise error("from a handler")

    transport.subscribe(f"{base}.*", hostile)
    transport.subscribe(f"{base}.*", handler)
    for i in range(3):
        transport.send(ef.Message(topic=f"{base}.x", payload=i))
    wait_for(lambda: len(got) == 3, what="deliveries after the BaseException")
    assert [m.payload for m in got] == [0, 1, 2]


def test_a_handler_may_request_over_the_same_transport(broker):
    base = unique_name()
    transport = broker.transport()
    queue = ef.MessageQueue(transport)
    other = ef.MessageQueue(broker.transport())
    other.subscribe(f"{base}.double", lambda m: other.reply(m, m.payload * 2))
    results: List[Any] = []

    def nested(message: ef.Message) -> None:
        reply = queue.request(f"{base}.double", message.payload, timeout=PATIENCE)
        results.append(reply.payload if reply else None)

    queue.subscribe(f"{base}.start", nested)
    other.publish(f"{base}.start", 21)
    wait_for(lambda: results, what="the nested request")
    assert results == [42]


def test_send_after_close_raises_and_close_is_idempotent(broker):
    transport = broker.transport()
    transport.close()
    transport.close()
    assert transport.closed
    with pytest.raises(ef.TransportClosedError):
        transport.send(ef.Message(topic="x", payload=1))
    with pytest.raises(ef.TransportClosedError):
        transport.subscribe("x", print)


def test_close_wakes_blocked_receivers(broker):
    transport = broker.transport()
    topic = f"{unique_name()}.r"
    result: List[Any] = ["not yet"]
    thread = threading.Thread(target=lambda: result.__setitem__(0, transport.receive(topic)))
    thread.start()
    wait_for(lambda: transport.stats["receivers"] == 1, what="the receiver")
    transport.close()
    thread.join(PATIENCE)
    assert result == [None]


def test_close_from_a_handler_does_not_hang(broker):
    base = unique_name()
    transport = broker.transport()
    closed = threading.Event()

    def closer(message: ef.Message) -> None:
        transport.close()
        closed.set()

    transport.subscribe(f"{base}.*", closer)
    transport.send(ef.Message(topic=f"{base}.x", payload=1))
    assert closed.wait(PATIENCE)


# -- broker specifics ------------------------------------------------------------------------


def test_redis_close_leaves_a_callers_client_open(redis_url, no_leaks):
    import redis

    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        transport = RedisTransport(client=client)
        got, handler = collector()
        topic = f"{unique_name()}.c"
        transport.subscribe(topic, handler)
        transport.send(ef.Message(topic=topic, payload=1))
        wait_for(lambda: got, what="the message")
        transport.close()
        assert client.ping() is True
    finally:
        client.close()


def test_nats_close_leaves_a_callers_client_open(nats_url, no_leaks):
    import nats

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="test-nats-loop")
    thread.start()
    try:
        nc = asyncio.run_coroutine_threadsafe(nats.connect(nats_url), loop).result(PATIENCE)
        transport = NatsTransport(client=nc, loop=loop)
        got, handler = collector()
        topic = f"{unique_name()}.c"
        transport.subscribe(topic, handler)
        transport.send(ef.Message(topic=topic, payload=1))
        wait_for(lambda: got, what="the message")
        transport.close()
        assert nc.is_connected
        asyncio.run_coroutine_threadsafe(nc.flush(), loop).result(PATIENCE)
        asyncio.run_coroutine_threadsafe(nc.close(), loop).result(PATIENCE)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(PATIENCE)
        loop.close()


def test_rpc_over_nats_shares_calls_among_workers_with_a_queue_group(nats_url, no_leaks):
    service = unique_name()
    owned: List[Any] = []
    calls: Dict[str, int] = collections.Counter()
    try:
        for name in ("w1", "w2", "w3"):
            transport = NatsTransport(nats_url)
            owned.append(transport)
            server = ef.RPCServer(ef.MessageQueue(transport), service_name=service)

            def who(name: str = name) -> str:
                calls[name] += 1
                return name

            server.add_method("who", who)
            server.serve(blocking=False)
        held = [t.debug_state()["nats_subscriptions"] for t in owned]
        assert all(len(routes) == 1 for routes in held)
        assert all(route[1] == RPC_QUEUE_GROUP for routes in held for route in routes)
        client_transport = NatsTransport(nats_url)
        owned.append(client_transport)
        client = ef.RPCClient(ef.MessageQueue(client_transport), service, timeout=PATIENCE)
        answers = collections.Counter(client.who() for _ in range(60))
        assert sum(calls.values()) == 60  # each call ran exactly once
        assert answers == calls
        assert len(answers) >= 2  # the broker spread them
    finally:
        for transport in owned:
            transport.close()


def test_redis_refuses_queue_groups(redis_url, no_leaks):
    transport = RedisTransport(url=redis_url)
    try:
        with pytest.raises(ValueError):
            transport.subscribe("x", print, queue="g")
        assert transport.stats["subscriptions"] == 0
    finally:
        transport.close()


def test_unreachable_broker_raises_connection_error(no_leaks):
    from _servers import free_port

    port = free_port()
    with pytest.raises(ConnectionError):
        RedisTransport(port=port, socket_connect_timeout=1.0)
    with pytest.raises(ConnectionError):
        NatsTransport(f"nats://127.0.0.1:{port}", connect_timeout=1.0, allow_reconnect=False)


# -- things going wrong -----------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_reconnect_and_resubscribe_after_a_broker_restart(private_broker):
    factory, server = private_broker
    base = unique_name()
    sub_side, pub_side = factory.transport(), factory.transport()
    got, handler = collector()
    sub_side.subscribe(f"{base}.*", handler)
    topic = f"{base}.q.mailbox"  # not matched by the subscription: kept for receive()
    assert sub_side.receive(topic, timeout=0) is None
    pub_side.send(ef.Message(topic=f"{base}.x", payload="before"))
    wait_for(lambda: got, what="the first message")

    server.restart(down_for=0.3)

    # At-most-once while down: keep publishing until one gets through.
    def delivered_after_restart() -> bool:
        pub_side.send(ef.Message(topic=f"{base}.x", payload="after"))
        time.sleep(0.05)
        return any(m.payload == "after" for m in got)

    wait_for(delivered_after_restart, timeout=45, what="a delivery after the restart")
    pub_side.send(ef.Message(topic=topic, payload="mailbox"))
    message = sub_side.receive(topic, timeout=PATIENCE)
    assert message is not None and message.payload == "mailbox"
    assert sub_side.stats["reconnects"] >= 1
    # request/reply works again, through both transports
    responder = ef.MessageQueue(sub_side)
    responder.subscribe(f"{base}.svc", lambda m: responder.reply(m, "ok"))
    reply = ef.MessageQueue(pub_side).request(f"{base}.svc", None, timeout=PATIENCE)
    assert reply is not None and reply.payload == "ok"


@pytest.mark.timeout(90)
def test_a_backlog_sent_while_the_broker_is_down_goes_out_after_it_is_back(private_broker):
    factory, server = private_broker
    base = unique_name()
    # A slow first retry, so the subscriber below is in place before the
    # publisher's backlog goes out (pub-sub keeps nothing for latecomers).
    if factory.kind == "redis":
        publisher = factory.transport(backoff_initial=1.0)
    else:
        publisher = factory.transport(reconnect_time_wait=1.5)
    server.stop()
    wait_for(lambda: not publisher.connected or factory.kind == "redis", what="disconnect")
    if factory.kind == "redis":
        publisher.send(ef.Message(topic=f"{base}.x", payload="lost"))
        wait_for(lambda: publisher.stats["dropped_out"] == 1, what="the failed write")
    for i in range(20):
        publisher.send(ef.Message(topic=f"{base}.x", payload=i))  # queued, no error
    server.start()
    subscriber = factory.transport()
    got, handler = collector()
    subscriber.subscribe(f"{base}.*", handler)  # confirmed by the broker on return
    assert publisher.flush(PATIENCE)
    wait_for(lambda: len(got) >= 20, what="the backlog")
    assert [m.payload for m in got] == list(range(20))


@pytest.mark.timeout(90)
def test_send_never_waits_for_the_broker(private_broker):
    """A paused broker does not block send(): publishing pays no round trip."""
    factory, server = private_broker
    base = unique_name()
    sub_side, pub_side = factory.transport(), factory.transport()
    got, handler = collector()
    sub_side.subscribe(f"{base}.*", handler)
    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        done = threading.Event()

        def publish() -> None:
            for i in range(200):
                pub_side.send(ef.Message(topic=f"{base}.x", payload=i))
            done.set()

        worker = threading.Thread(target=publish, name="test-publisher")
        worker.start()
        assert done.wait(PATIENCE), "send() blocked while the broker was paused"
        worker.join()
    finally:
        os.kill(server.process.pid, signal.SIGCONT)
    assert pub_side.flush(PATIENCE)
    wait_for(lambda: len(got) == 200, what="the 200 messages")
    assert [m.payload for m in got] == list(range(200))


# -- packaging --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "module, cls, extra",
    [("eventforge_ext.redis", "RedisTransport", "redis"),
     ("eventforge_ext.nats", "NatsTransport", "nats")],
)
def test_a_missing_client_names_the_extra(module, cls, extra):
    code = (
        f"import sys; sys.modules[{extra!r}] = None\n"
        f"import eventforge_ext, {module} as m\n"
        f"try:\n    m.{cls}()\nexcept ImportError as exc:\n    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert f"pip install 'eventforge[{extra}]'" in out.stdout, out.stderr


def test_importing_the_adapters_imports_no_client():
    code = (
        "import sys, eventforge, eventforge_ext, eventforge_ext.redis, eventforge_ext.nats\n"
        "from eventforge.transports.redis import RedisTransport\n"
        "from eventforge.transports.nats import NatsTransport\n"
        "print(sorted(m for m in ('redis', 'nats', 'logfire') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.stdout.strip() == "[]", out.stderr


@pytest.mark.timeout(90)
def test_redis_send_raises_transport_full_past_max_pending(redis_server, no_leaks):
    """Backpressure is bounded: past max_pending waiting messages send() raises."""
    transport = RedisTransport(url=redis_server.url, max_pending=50, socket_timeout=30)
    try:
        os.kill(redis_server.process.pid, signal.SIGSTOP)
        try:
            with pytest.raises(ef.TransportFullError):
                for i in range(1000):
                    transport.send(ef.Message(topic="full.x", payload=i))
            assert transport.stats["full"] == 1
            assert transport.stats["pending"] == 50
        finally:
            os.kill(redis_server.process.pid, signal.SIGCONT)
        assert transport.flush(PATIENCE)
        assert transport.stats["pending"] == 0
    finally:
        transport.close()


def test_outbox_batches_in_order_and_reports_idle():
    from eventforge_ext._broker import Outbox

    outbox = Outbox(3, "the test broker")
    assert outbox.put(("a", b"1")) is True  # the caller starts the drainer
    assert outbox.put(("a", b"2")) is False  # it is running
    assert outbox.put(("a", b"3")) is False
    with pytest.raises(ef.TransportFullError, match="3 messages wait for the test broker"):
        outbox.put(("a", b"4"))
    assert outbox.wait_idle(0.01) is False
    assert outbox.take(2) == [("a", b"1"), ("a", b"2")]
    assert outbox.take() == [("a", b"3")]
    assert outbox.take() is None
    assert outbox.wait_idle(0.01) is True
    assert outbox.put(("a", b"5")) is True  # idle again: start a new drainer
    with pytest.raises(ValueError):
        Outbox(0, "x")
