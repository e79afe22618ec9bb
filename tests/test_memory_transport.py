"""MemoryTransport: the delivery model of DESIGN section 5, at the transport level."""

from __future__ import annotations

import logging
import threading
import time

import pytest
from _core_helpers import PATIENCE, SLACK, run_threads, wait_until

import eventforge as ef


@pytest.fixture
def transport():
    t = ef.MemoryTransport()
    yield t
    t.close()


def _receive_in_thread(transport, topic, timeout=PATIENCE):
    result = {}

    def run():
        result["message"] = transport.receive(topic, timeout)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def test_is_a_transport_and_validates_its_size():
    assert isinstance(ef.MemoryTransport(), ef.Transport)
    for bad in (0, -1, 1.5, "10"):
        with pytest.raises(ValueError, match="max_queue_size"):
            ef.MemoryTransport(max_queue_size=bad)


def test_synchronous_delivery_in_subscription_order(transport):
    calls = []
    for name, pattern in [("first", "a.*"), ("second", "**"), ("third", "a.b"), ("x", "b.*")]:
        transport.subscribe(pattern, lambda m, name=name: calls.append((name, m.payload)))
    transport.send(ef.Message("a.b", 1))
    # Delivered before send() returned, in the order of subscription.
    assert calls == [("first", 1), ("second", 1), ("third", 1)]


def test_delivery_happens_in_the_publishers_thread(transport):
    seen = []
    transport.subscribe("t", lambda m: seen.append(threading.get_ident()))
    transport.send(ef.Message("t"))
    assert seen == [threading.get_ident()]


def test_handler_exception_is_isolated_logged_and_counted(transport, caplog):
    calls = []

    def broken(message):
        raise RuntimeError("handler boom")

    transport.subscribe("t", lambda m: calls.append("before"))
    transport.subscribe("t", broken)
    transport.subscribe("t", lambda m: calls.append("after"))
    with caplog.at_level(logging.ERROR, logger="eventforge"):
        transport.send(ef.Message("t"))  # does not raise
        transport.send(ef.Message("t"))
    assert calls == ["before", "after", "before", "after"]
    assert transport.stats["handler_errors"] == 2
    failures = [r for r in caplog.records if "broken" in r.getMessage()]
    assert len(failures) == 2
    assert failures[0].exc_info and "handler boom" in str(failures[0].exc_info[1])


def test_mailbox_only_for_unconsumed_messages(transport):
    transport.subscribe("taken", lambda m: None)
    transport.send(ef.Message("taken", 1))
    assert transport.stats["mailboxes"] == 0
    assert transport.receive("taken", timeout=0) is None  # a subscriber took it
    transport.send(ef.Message("kept", 2))
    stats = transport.stats
    assert stats["mailboxes"] == 1 and stats["buffered"] == 1
    assert transport.receive("kept", timeout=0).payload == 2
    assert transport.stats["mailboxes"] == 0  # drained mailboxes are removed


def test_a_subscribed_message_is_never_buffered_even_for_patterns(transport):
    transport.subscribe("a.**", lambda m: None)
    for i in range(50):
        transport.send(ef.Message(f"a.b{i}", i))
    stats = transport.stats
    assert stats["mailboxes"] == 0 and stats["buffered"] == 0
    assert all(transport.receive(f"a.b{i}", timeout=0) is None for i in range(50))


def test_send_then_receive_is_fifo(transport):
    for i in range(100):
        transport.send(ef.Message("q", i))
        transport.send(ef.Message("other", -i))
    assert [transport.receive("q", timeout=0).payload for _ in range(100)] == list(range(100))
    assert [transport.receive("other", 0).payload for _ in range(100)] == [-i for i in range(100)]
    assert transport.receive("q", timeout=0) is None
    assert transport.stats["mailboxes"] == 0


def test_a_blocked_receiver_takes_the_message_directly(transport):
    thread, result = _receive_in_thread(transport, "direct")
    assert wait_until(lambda: transport.stats["receivers"] == 1)
    transport.send(ef.Message("direct", "hi"))
    thread.join(PATIENCE)
    assert result["message"].payload == "hi"
    stats = transport.stats
    assert stats["mailboxes"] == 0 and stats["receivers"] == 0


def test_blocked_receivers_are_served_oldest_first(transport):
    first, first_result = _receive_in_thread(transport, "line")
    assert wait_until(lambda: transport.stats["receivers"] == 1)
    second, second_result = _receive_in_thread(transport, "line")
    assert wait_until(lambda: transport.stats["receivers"] == 2)
    transport.send(ef.Message("line", 1))
    transport.send(ef.Message("line", 2))
    first.join(PATIENCE)
    second.join(PATIENCE)
    assert first_result["message"].payload == 1
    assert second_result["message"].payload == 2


def test_a_full_mailbox_drops_its_oldest_message_and_never_raises(caplog):
    transport = ef.MemoryTransport(max_queue_size=3)
    transport.subscribe("busy", lambda m: None)
    for i in range(10):  # consumed by a subscriber: never kept
        transport.send(ef.Message("busy", i))
    assert transport.stats["buffered"] == 0
    with caplog.at_level(logging.WARNING, logger="eventforge"):
        for i in range(1005):  # nobody listens: publishing still just works
            transport.send(ef.Message("slow", i))
    stats = transport.stats
    assert stats["sent"] == 1015
    assert stats["buffered"] == 3 and stats["mailboxes"] == 1
    assert stats["dropped_topic_full"] == 1002 and stats["dropped"] == 1002
    assert [transport.receive("slow", 0).payload for _ in range(3)] == [1002, 1003, 1004]
    assert transport.stats["mailboxes"] == 0 and transport.stats["buffered"] == 0
    # One log line for 1,002 drops on one topic, never one per message.
    lines = [r for r in caplog.records if "dropped the oldest" in r.getMessage()]
    assert len(lines) == 1 and "'slow'" in lines[0].getMessage()
    assert "max_queue_size=3" in lines[0].getMessage()
    transport.close()


def test_the_total_cap_drops_the_oldest_message_of_any_topic():
    transport = ef.MemoryTransport(max_queue_size=10, max_buffered=4)
    for topic, n in (("a", 1), ("b", 1), ("a", 2), ("c", 1), ("b", 2)):
        transport.send(ef.Message(topic, n))
    stats = transport.stats
    assert stats["buffered"] == 4 and stats["dropped_buffer_full"] == 1
    assert transport.receive("a", 0).payload == 2  # a/1 was the oldest of all
    transport.send(ef.Message("d", 1))
    transport.send(ef.Message("d", 2))  # now b/1 is the oldest
    assert transport.receive("b", 0).payload == 2
    assert transport.receive("b", 0) is None
    assert [transport.receive("d", 0).payload for _ in range(2)] == [1, 2]
    assert transport.receive("c", 0).payload == 1
    assert transport.stats["buffered"] == 0 and transport.stats["mailboxes"] == 0
    assert transport.stats["dropped"] == 2
    transport.close()


def test_max_buffered_is_validated_and_has_a_documented_default():
    assert ef.MemoryTransport().max_buffered == ef.DEFAULT_MAX_BUFFERED == 10_000
    for bad in (0, -1, 1.5, "10", True):
        with pytest.raises(ValueError, match="max_buffered"):
            ef.MemoryTransport(max_buffered=bad)


def test_fifty_thousand_one_off_topics_stay_bounded():
    transport = ef.MemoryTransport()
    for i in range(50_000):
        transport.send(ef.Message(f"job.{i}.done", i))
    stats = transport.stats
    assert stats["buffered"] == transport.max_buffered == 10_000
    assert stats["mailboxes"] == 10_000
    assert stats["dropped_buffer_full"] == 40_000
    # The index (counted in "buffered") follows the messages.
    assert sum(len(kept) for kept in transport.debug_state()["mailboxes"].values()) == 10_000
    assert transport.receive("job.49999.done", 0).payload == 49_999
    assert transport.receive("job.0.done", 0) is None  # the oldest went first
    for i in range(40_000, 49_999):
        assert transport.receive(f"job.{i}.done", 0).payload == i
    assert transport.stats["mailboxes"] == 0 and transport.stats["buffered"] == 0
    assert transport.debug_state()["mailboxes"] == {}
    transport.close()


def test_send_then_receive_and_subscriber_messages_are_not_also_kept(transport):
    got = []
    transport.subscribe("both", got.append)
    transport.send(ef.Message("both", 1))
    assert transport.receive("both", 0) is None  # a subscriber took it
    transport.send(ef.Message("only", 2))
    assert transport.receive("only", 0).payload == 2
    assert [m.payload for m in got] == [1]


def test_sent_is_exact_while_publishers_and_readers_race():
    # Publishers count without a lock; every stats read must still be exact
    # (never ahead of the sends, never going back) and the total must match.
    transport = ef.MemoryTransport()
    transport.subscribe("count.*", lambda message: None)
    publishers, per_thread = 4, 5_000
    seen = []

    def publisher():
        for i in range(per_thread):
            transport.send(ef.Message("count.it", i))

    def reader():
        for _ in range(2_000):
            seen.append(transport.stats["sent"])

    run_threads([publisher] * publishers + [reader])
    assert seen == sorted(seen) and seen[-1] <= publishers * per_thread
    assert transport.stats["sent"] == publishers * per_thread
    assert transport.stats["sent"] == publishers * per_thread  # reading counts nothing
    transport.close()


def test_the_inbox_seam_opens_a_subclass_and_calls_back_after_withdrawal(transport):
    # MemoryTransport._open_inbox, for transports built on it (documented in
    # its docstring): the inbox is of the given kind from the start, takes
    # what the mailbox kept, and on_close runs once the interest is gone.
    class Kind(ef.Inbox):
        pass

    transport.send(ef.Message("seam.topic", "kept"))
    closed = []
    inbox = transport._open_inbox(
        "seam.topic", Kind, lambda i: closed.append((i, transport.stats["inboxes"]))
    )
    assert type(inbox) is Kind and inbox.maxsize == transport.max_queue_size
    assert inbox.get(0).payload == "kept"
    transport.send(ef.Message("seam.topic", "direct"))
    assert inbox.get(0).payload == "direct" and transport.receive("seam.topic", 0) is None
    inbox.close()
    assert closed == [(inbox, 0)]
    transport.send(ef.Message("seam.topic", "later"))  # kept again: nobody has an inbox
    assert transport.receive("seam.topic", 0).payload == "later"


def test_server_local_publish_past_the_old_limit_does_not_raise(tcp):
    server = tcp.server()
    for i in range(1001):  # the 1,001st used to raise TransportFullError
        server.send(ef.Message("nobody.listens", i))
    stats = server.stats
    assert stats["dropped_topic_full"] == 1
    assert stats["buffered"] == 1000


def test_late_replies_to_inbox_topics_are_dropped_and_counted(transport, caplog):
    with caplog.at_level(logging.DEBUG, logger="eventforge"):
        transport.send(ef.Message("_reply.nobody-waits", 1))
        transport.send(ef.Message("_rpc_reply.nobody-waits", 2))
    stats = transport.stats
    assert stats["dropped"] == 2 and stats["mailboxes"] == 0
    assert any("nobody awaits" in r.getMessage() for r in caplog.records)


def test_inbox_keeps_a_reply_that_arrives_before_the_wait(transport):
    inbox = transport.open_inbox("_reply.abc")
    assert transport.stats["inboxes"] == 1
    transport.send(ef.Message("_reply.abc", "early"))
    assert inbox.get(timeout=0).payload == "early"
    with pytest.raises(ValueError, match="already open"):
        transport.open_inbox("_reply.abc")
    inbox.close()
    assert inbox.closed
    assert transport.stats["inboxes"] == 0
    transport.send(ef.Message("_reply.abc", "late"))
    assert transport.stats["dropped"] == 1 and transport.stats["mailboxes"] == 0


def test_receive_with_a_pattern_is_a_clear_topic_error(transport):
    for pattern in ("a.*", "a.**", "*"):
        with pytest.raises(ef.TopicError, match="exact topic.*subscribe"):
            transport.receive(pattern, timeout=0)
    with pytest.raises(ef.TopicError):
        transport.receive("a..b", timeout=0)


def test_send_validates_the_topic(transport):
    for bad in ("a.*", "", "$sys.x", "a b"):
        with pytest.raises(ef.TopicError):
            transport.send(ef.Message(bad))
    assert transport.stats["sent"] == 0


def test_subscribe_validates(transport):
    with pytest.raises(ef.TopicError, match="partial wildcard"):
        transport.subscribe("a.b*", lambda m: None)
    with pytest.raises(TypeError, match="callable"):
        transport.subscribe("a", "not callable")


def test_unsubscribe(transport):
    calls = []
    sub_id = transport.subscribe("t", calls.append)
    assert transport.unsubscribe(sub_id) is True
    assert transport.unsubscribe(sub_id) is False
    assert transport.unsubscribe("sub-unknown") is False
    transport.send(ef.Message("t"))
    assert calls == []
    assert transport.stats["subscriptions"] == 0


def test_close_semantics():
    transport = ef.MemoryTransport()
    thread, result = _receive_in_thread(transport, "waiting")
    assert wait_until(lambda: transport.stats["receivers"] == 1)
    inbox = transport.open_inbox("_reply.x")
    inbox_result = {}
    inbox_thread = threading.Thread(
        target=lambda: inbox_result.setdefault("m", inbox.get(PATIENCE)), daemon=True
    )
    inbox_thread.start()
    transport.send(ef.Message("buffered", 1))
    transport.close()
    thread.join(PATIENCE)
    inbox_thread.join(PATIENCE)
    assert not thread.is_alive() and result["message"] is None  # woken with None
    assert not inbox_thread.is_alive() and inbox_result["m"] is None
    assert transport.closed
    with pytest.raises(ef.TransportClosedError) as caught:
        transport.send(ef.Message("t"))
    assert isinstance(caught.value, RuntimeError)
    started = time.monotonic()
    assert transport.receive("buffered") is None  # no timeout: returns at once
    assert time.monotonic() - started < 1
    with pytest.raises(ef.TransportClosedError):
        transport.subscribe("t", lambda m: None)
    with pytest.raises(ef.TransportClosedError):
        transport.open_inbox("_reply.y")
    transport.close()  # idempotent
    stats = transport.stats
    assert stats["subscriptions"] == stats["mailboxes"] == stats["receivers"] == 0
    assert stats["inboxes"] == 0


def test_context_manager_closes():
    with ef.MemoryTransport() as transport:
        transport.send(ef.Message("t"))
    assert transport.closed
    with pytest.raises(RuntimeError):
        transport.send(ef.Message("t"))


def test_unsubscribe_during_delivery_skips_the_removed_subscriber(transport):
    calls = []
    later = {}

    def first(message):
        calls.append("first")
        transport.unsubscribe(later["id"])

    transport.subscribe("t", first)
    later["id"] = transport.subscribe("t", lambda m: calls.append("later"))
    transport.send(ef.Message("t"))
    assert calls == ["first"]


def test_receive_timeout_is_honoured(transport):
    asked = 0.2
    started = time.monotonic()
    assert transport.receive("quiet", timeout=asked) is None
    elapsed = time.monotonic() - started
    assert asked - 0.005 <= elapsed <= asked + SLACK
    assert transport.stats["receivers"] == 0  # the gave-up receiver left nothing


def test_zero_timeout_does_not_block(transport):
    started = time.monotonic()
    assert transport.receive("quiet", timeout=0) is None
    assert transport.receive("quiet", timeout=-1) is None
    assert time.monotonic() - started < SLACK


def test_concurrent_senders_and_receivers_lose_nothing():
    count, senders, receivers = 500, 4, 3
    # Room for everything: senders may outpace receivers (that is backpressure's job).
    transport = ef.MemoryTransport(max_queue_size=count * senders + receivers)
    received = []
    lock = threading.Lock()
    finished = []

    def sender(base):
        def run():
            for i in range(count):
                transport.send(ef.Message("work", base + i))
            with lock:
                finished.append(base)
                last = len(finished) == senders
            if last:  # one stop sign per receiver, after all the work
                for _ in range(receivers):
                    transport.send(ef.Message("work", None))

        return run

    def receiver():
        while True:
            message = transport.receive("work", timeout=PATIENCE)
            assert message is not None, "receiver starved"
            if message.payload is None:
                return
            with lock:
                received.append(message.payload)

    run_threads([sender(k * count) for k in range(senders)] + [receiver] * receivers)
    assert sorted(received) == list(range(count * senders))
    stats = transport.stats
    assert stats["mailboxes"] == 0 and stats["receivers"] == 0


def test_a_full_inbox_counts_its_drops_and_logs_once(caplog):
    transport = ef.MemoryTransport(max_queue_size=2)
    inbox = transport.open_inbox("_reply.many")
    with caplog.at_level(logging.WARNING, logger="eventforge"):
        for i in range(7):
            transport.send(ef.Message("_reply.many", i))
    assert inbox.dropped == 5
    assert [inbox.get(0).payload for _ in range(2)] == [0, 1]
    assert len([r for r in caplog.records if "_reply.many" in r.getMessage()]) == 1
    inbox.close()
    transport.close()


def test_a_logging_handler_may_publish_while_a_drop_is_logged():
    # The drop warning is logged with the transport's lock released: a handler
    # that forwards log records onto the same transport must not deadlock.
    transport = ef.MemoryTransport(max_queue_size=1)
    forwarded = []
    transport.subscribe("logs", forwarded.append)

    class Forward(logging.Handler):
        def emit(self, record):
            transport.send(ef.Message("logs", record.getMessage()))

    handler = Forward(logging.WARNING)
    log = logging.getLogger("eventforge")
    log.addHandler(handler)
    try:
        run_threads([lambda: [transport.send(ef.Message("full", i)) for i in range(3)]])
    finally:
        log.removeHandler(handler)
    assert len(forwarded) == 1 and "'full'" in forwarded[0].payload
    assert transport.receive("full", 0).payload == 2
    transport.close()


def test_drop_logging_is_bounded_across_many_topics(caplog):
    transport = ef.MemoryTransport(max_buffered=5)
    with caplog.at_level(logging.WARNING, logger="eventforge"):
        for i in range(500):
            transport.send(ef.Message(f"one.off.{i}", i))
    assert transport.stats["dropped_buffer_full"] == 495
    lines = [r for r in caplog.records if "dropped the oldest" in r.getMessage()]
    assert len(lines) == ef.MemoryTransport._DROP_LOG_TOPICS == 20
    transport.drop_log_interval = 0.0  # a new interval: the topic may be logged again
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="eventforge"):
        transport.send(ef.Message("another", 0))
    assert len(caplog.records) == 1
    transport.close()


def test_requests_to_a_service_nobody_serves_cost_bounded_memory():
    queue = ef.MessageQueue(transport=ef.MemoryTransport(max_queue_size=100))
    for i in range(1500):
        assert queue.request("nobody.serves", i, timeout=0) is None
    stats = queue.transport.stats
    assert stats["buffered"] == 100 and stats["dropped_topic_full"] == 1400
    assert stats["inboxes"] == 0 and stats["receivers"] == 0
    queue.close()
