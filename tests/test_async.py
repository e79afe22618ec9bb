"""Asyncio-native receive_async / request_async: exact timeouts, no loss on cancel."""

from __future__ import annotations

import asyncio
import random
import threading
import time

import pytest
from _core_helpers import PATIENCE, SLACK

import eventforge as ef


def run(coro):
    return asyncio.run(coro)


def test_receive_async_takes_a_buffered_message_at_once():
    async def main():
        queue = ef.MessageQueue()
        queue.publish("jobs", 1)
        queue.publish("jobs", 2)
        first = await queue.receive_async("jobs", timeout=0)
        second = await queue.receive_async("jobs")
        return first.payload, second.payload, queue.transport.stats["mailboxes"]

    assert run(main()) == (1, 2, 0)


@pytest.mark.parametrize("asked", [0.2])
def test_receive_async_timeout_is_exact(asked):
    async def main():
        queue = ef.MessageQueue()
        started = time.monotonic()
        result = await queue.receive_async("quiet", timeout=asked)
        return result, time.monotonic() - started, queue.transport.stats["receivers"]

    result, elapsed, receivers = run(main())
    assert result is None
    assert asked - 0.005 <= elapsed <= asked + SLACK
    assert receivers == 0


@pytest.mark.parametrize("asked", [0.2])
def test_request_async_timeout_is_exact(asked):
    async def main():
        queue = ef.MessageQueue()
        started = time.monotonic()
        result = await queue.request_async("nobody", 1, timeout=asked)
        return result, time.monotonic() - started, queue.transport.stats["inboxes"]

    result, elapsed, inboxes = run(main())
    assert result is None
    assert asked - 0.005 <= elapsed <= asked + SLACK
    assert inboxes == 0


def test_zero_timeout_returns_at_once():
    async def main():
        queue = ef.MessageQueue()
        started = time.monotonic()
        assert await queue.receive_async("quiet", timeout=0) is None
        return time.monotonic() - started

    assert run(main()) < SLACK


def test_request_async_gets_the_reply():
    async def main():
        queue = ef.MessageQueue()

        @queue.on("math.square")
        def square(message):
            queue.reply(message, message.payload**2)

        replies = [await queue.request_async("math.square", i, timeout=PATIENCE) for i in range(50)]
        return [r.payload for r in replies], queue.transport.stats

    payloads, stats = run(main())
    assert payloads == [i * i for i in range(50)]
    assert stats["inboxes"] == 0 and stats["mailboxes"] == 0


def test_receive_async_is_woken_by_a_publish_from_another_thread():
    async def main():
        queue = ef.MessageQueue()
        timer = threading.Timer(0.05, lambda: queue.publish("wake", "up"))
        timer.start()
        started = time.monotonic()
        message = await queue.receive_async("wake", timeout=PATIENCE)
        timer.join()
        return message.payload, time.monotonic() - started

    payload, elapsed = run(main())
    assert payload == "up"
    assert elapsed < PATIENCE / 2  # woken, not timed out


def test_request_async_answered_from_another_thread():
    async def main():
        queue = ef.MessageQueue()

        @queue.on("slow.svc")
        def slow(message):
            threading.Timer(0.02, lambda: queue.reply(message, "done")).start()

        reply = await queue.request_async("slow.svc", timeout=PATIENCE)
        return reply.payload

    assert run(main()) == "done"


def test_no_polling_thread():
    # Compare thread sets, not counts, so a thread left over by some other
    # test that happens to finish meanwhile cannot disturb this one.
    before = set(threading.enumerate())
    new_threads = []

    async def main():
        queue = ef.MessageQueue()
        receive = asyncio.ensure_future(queue.receive_async("later", timeout=PATIENCE))
        request = asyncio.ensure_future(queue.request_async("svc.later", timeout=PATIENCE))
        await asyncio.sleep(0.05)
        new_threads.append(set(threading.enumerate()) - before)  # both waiting now
        queue.subscribe("svc.later", lambda m: queue.reply(m, "r"))
        queue.publish("later", "x")
        assert (await receive).payload == "x"
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
        new_threads.append(set(threading.enumerate()) - before)
        return queue.transport.stats

    stats = run(main())
    new_threads.append(set(threading.enumerate()) - before)
    assert new_threads == [set(), set(), set()]
    assert stats["receivers"] == 0 and stats["inboxes"] == 0


def test_close_wakes_an_awaiting_receiver_with_none():
    async def main():
        queue = ef.MessageQueue()
        task = asyncio.ensure_future(queue.receive_async("w", timeout=PATIENCE))
        request = asyncio.ensure_future(queue.request_async("svc", timeout=PATIENCE))
        await asyncio.sleep(0.01)
        threading.Thread(target=queue.close).start()
        results = await asyncio.wait_for(asyncio.gather(task, request), PATIENCE)
        return results, await queue.receive_async("w")

    assert run(main()) == ([None, None], None)


@pytest.mark.parametrize("timeout", [None, PATIENCE])
def test_cancel_after_hand_over_requeues_the_message(timeout):
    # Deterministic form of the race: the message is handed to the waiting
    # coroutine, which is cancelled before it resumes.  The message must go
    # back to the mailbox, not vanish.
    async def main():
        transport = ef.MemoryTransport()
        task = asyncio.ensure_future(transport.receive_async("c", timeout))
        await asyncio.sleep(0)  # registered as a receiver
        assert transport.stats["receivers"] == 1
        transport.send(ef.Message("c", "precious"))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return transport.receive("c", timeout=0), transport.stats

    message, stats = run(main())
    assert message is not None and message.payload == "precious"
    assert stats["receivers"] == 0 and stats["mailboxes"] == 0


@pytest.mark.parametrize("timeout", [None, PATIENCE])
def test_no_message_lost_when_cancelling_during_sends_from_another_thread(timeout):
    iterations = 400

    async def main():
        transport = ef.MemoryTransport(max_queue_size=iterations)
        rnd = random.Random(7)
        got = []
        for i in range(iterations):
            task = asyncio.ensure_future(transport.receive_async("c", timeout))
            await asyncio.sleep(0)
            sender = threading.Thread(target=transport.send, args=(ef.Message("c", i),))
            sender.start()
            # Move the cancel around the send: block the loop for a moment (the
            # sender thread runs meanwhile) and/or let the loop turn a few times.
            time.sleep(rnd.choice([0, 0, 0, 1e-5, 1e-4, 5e-4]))
            for _ in range(rnd.randrange(3)):
                await asyncio.sleep(0)
            task.cancel()
            try:
                message = await task
            except asyncio.CancelledError:
                pass
            else:
                if message is not None:
                    got.append(message.payload)
            sender.join()
            # A message the cancelled receiver did not return must be in the
            # mailbox (drained now, so the next receiver really waits).
            while True:
                message = transport.receive("c", timeout=0)
                if message is None:
                    break
                got.append(message.payload)
        return got, transport.stats

    got, stats = run(main())
    assert sorted(got) == list(range(iterations))  # every message exactly once
    assert stats["receivers"] == 0 and stats["mailboxes"] == 0


def test_inbox_cancel_after_hand_over_requeues():
    async def main():
        transport = ef.MemoryTransport()
        inbox = transport.open_inbox("_reply.r1")
        task = asyncio.ensure_future(inbox.get_async(PATIENCE))
        await asyncio.sleep(0)
        transport.send(ef.Message("_reply.r1", "answer"))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        kept = await inbox.get_async(0)
        inbox.close()
        return kept, transport.stats

    kept, stats = run(main())
    assert kept is not None and kept.payload == "answer"
    assert stats["inboxes"] == 0


def test_cancelled_request_async_leaves_no_inbox():
    async def main():
        queue = ef.MessageQueue()
        pending = []
        queue.subscribe("svc", pending.append)
        tasks = [asyncio.ensure_future(queue.request_async("svc", i)) for i in range(20)]
        await asyncio.sleep(0.01)
        assert queue.transport.stats["inboxes"] == 20
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for message in pending:
            queue.reply(message, "late")
        return queue.transport.stats

    stats = run(main())
    assert stats["inboxes"] == 0 and stats["mailboxes"] == 0
    assert stats["dropped"] == 20
