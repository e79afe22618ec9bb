"""Asyncio-native receive_async / request_async: exact timeouts, no loss on cancel."""

from __future__ import annotations

import asyncio

import pytest
from _core_helpers import PATIENCE

import eventforge as ef


def run(coro):
    return asyncio.run(coro)


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
