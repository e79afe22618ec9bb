"""RedisTransport and NatsTransport against their bare client libraries, same run.

    python bench/bench_adapters.py            # all figures
    python bench/bench_adapters.py --quick    # fewer, shorter rounds

Brokers: EVENTFORGE_REDIS_URL / EVENTFORGE_NATS_URL when set, else a
redis-server and a nats-server started on free loopback ports for the run
(tests/_servers.py), stopped at the end.

Measured per round, eventforge and the bare client one after the other
(the order alternates between rounds, so both see the same machine load):

* publish throughput: N small messages published and flushed (the broker has
  them all).  eventforge: ``transport.send(Message)`` N times, then
  ``flush()``.  Bare redis-py: ``PUBLISH`` in pipelines of 1000.  Bare
  nats-py: ``await nc.publish`` N times, then ``await nc.flush()``, in one
  event loop.  The bare clients run twice: sending the same messages
  (a Message encoded by the core, so the ratio is the adapter's own cost; the
  verdict uses this one) and sending only ``json.dumps(payload)`` (what
  eventforge costs in all, envelope included).  No subscriber listens, so
  only the publishing side is measured.
* request/reply p50: M sequential requests to a responder in the same process
  on its own connection.  eventforge: ``MessageQueue.request`` answered by a
  subscriber calling ``reply``.  Bare redis-py: PUBLISH the request (with a
  reply channel), a responder thread reading its pubsub PUBLISHes the answer,
  the caller reads its pubsub.  Bare nats-py: ``await nc.request`` answered by
  ``msg.respond`` in the same event loop.

Printed: per-round ratios eventforge / bare (throughput: higher is better;
p50: bare p50 / eventforge p50, higher is better), their median with the
min-max spread, and a verdict computed from the median throughput ratio
against the issue-11 target (>= 0.8).  The machine may be shared: compare figures from one run only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(1, os.path.join(ROOT, "tests"))

import eventforge as ef  # noqa: E402

TARGET = 0.8
PAYLOAD = {"order": 12345, "item": "book", "qty": 2}


# -- brokers -----------------------------------------------------------------------------

class Brokers:
    def __init__(self) -> None:
        self.servers: List[Any] = []
        self.redis_url = os.environ.get("EVENTFORGE_REDIS_URL") or self._start("RedisServer")
        self.nats_url = os.environ.get("EVENTFORGE_NATS_URL") or self._start("NatsServer")

    def _start(self, kind: str) -> str:
        import _servers

        server = getattr(_servers, kind)().start()
        self.servers.append(server)
        return server.url

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


# -- publish throughput ---------------------------------------------------------------------

def ef_publish(transport: Any, topic: str, n: int) -> float:
    send = transport.send
    start = time.perf_counter()
    for _ in range(n):
        send(ef.Message(topic=topic, payload=PAYLOAD))
    if not transport.flush(60):
        raise RuntimeError("flush timed out")
    return n / (time.perf_counter() - start)


def payload_body(topic: str) -> bytes:
    """What a bare client sends when it has only the payload to carry."""
    return json.dumps(PAYLOAD).encode()


def message_body(topic: str) -> bytes:
    """The body eventforge sends: the whole Message, encoded by the core."""
    return ef.encode(ef.Message(topic=topic, payload=PAYLOAD))[4:]


def redis_bare_publish(client: Any, channel: str, n: int, body: Callable[[str], bytes]) -> float:
    start = time.perf_counter()
    done = 0
    while done < n:
        pipe = client.pipeline(transaction=False)
        for _ in range(min(1000, n - done)):
            pipe.publish(channel, body(channel))
        pipe.execute()
        done += min(1000, n - done)
    return n / (time.perf_counter() - start)


class NatsBare:
    """A nats-py client on an event loop of this thread (the natural way to use it)."""

    def __init__(self, url: str) -> None:
        import nats

        self.loop = asyncio.new_event_loop()
        self.nc = self.loop.run_until_complete(nats.connect(url))
        self.nc2 = self.loop.run_until_complete(nats.connect(url))

    def publish(self, subject: str, n: int, body: Callable[[str], bytes]) -> float:
        async def run() -> float:
            publish = self.nc.publish
            start = time.perf_counter()
            for _ in range(n):
                await publish(subject, body(subject))
            await self.nc.flush(60)
            return n / (time.perf_counter() - start)

        return self.loop.run_until_complete(run())

    def serve(self, subject: str) -> None:
        async def respond(msg: Any) -> None:
            await msg.respond(msg.data)

        self.loop.run_until_complete(self.nc2.subscribe(subject, cb=respond))
        self.loop.run_until_complete(self.nc2.flush())

    def request_p50(self, subject: str, m: int) -> float:
        async def run() -> List[float]:
            times = []
            body = json.dumps(PAYLOAD).encode()
            for _ in range(m):
                t0 = time.perf_counter()
                await self.nc.request(subject, body, timeout=10)
                times.append(time.perf_counter() - t0)
            return times

        return statistics.median(self.loop.run_until_complete(run()))

    def close(self) -> None:
        self.loop.run_until_complete(self.nc.close())
        self.loop.run_until_complete(self.nc2.close())
        self.loop.close()


# -- request/reply ----------------------------------------------------------------------------

def ef_request_p50(queue: ef.MessageQueue, topic: str, m: int) -> float:
    times = []
    for _ in range(m):
        t0 = time.perf_counter()
        if queue.request(topic, PAYLOAD, timeout=10) is None:
            raise RuntimeError("request timed out")
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class RedisBareRequests:
    """Request/reply with plain redis-py: PUBLISH + a pubsub on each side."""

    def __init__(self, url: str, channel: str) -> None:
        import redis

        self.client = redis.Redis.from_url(url)
        self.channel = channel
        self.reply_channel = channel + ".reply"
        self.replies = self.client.pubsub(ignore_subscribe_messages=True)
        self.replies.subscribe(self.reply_channel)
        self._wait_subscribed(self.replies)
        self.requests = self.client.pubsub(ignore_subscribe_messages=True)
        self.requests.subscribe(channel)
        self._wait_subscribed(self.requests)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._respond, name="bench-redis-responder")
        self.thread.start()

    @staticmethod
    def _wait_subscribed(pubsub: Any) -> None:
        while pubsub.get_message(timeout=1.0) is None and not pubsub.subscribed:
            pass

    def _respond(self) -> None:
        client = self.client
        while not self.stop.is_set():
            message = self.requests.get_message(timeout=0.2)
            if message is not None:
                request = json.loads(message["data"])
                client.publish(request["reply_to"], json.dumps(request["payload"]))

    def p50(self, m: int) -> float:
        times = []
        body = json.dumps({"reply_to": self.reply_channel, "payload": PAYLOAD})
        for _ in range(m):
            t0 = time.perf_counter()
            self.client.publish(self.channel, body)
            while self.replies.get_message(timeout=10) is None:
                pass
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.requests.close()
        self.replies.close()
        self.client.close()


# -- the run ----------------------------------------------------------------------------------

def alternate(rounds: int, ours: Callable[[], float], bare: Callable[[], float]
              ) -> Tuple[List[float], List[float]]:
    ours_values, bare_values = [], []
    for round_no in range(rounds):
        if round_no % 2 == 0:
            ours_values.append(ours())
            bare_values.append(bare())
        else:
            bare_values.append(bare())
            ours_values.append(ours())
    return ours_values, bare_values


def report(label: str, ours: List[float], bare: List[float], unit: str, higher_better: bool,
           target: Any) -> Dict[str, Any]:
    ratios = [(o / b) if higher_better else (b / o) for o, b in zip(ours, bare)]
    median = statistics.median(ratios)
    scale = 1.0 if unit == "msg/s" else 1e6
    shown = "us" if unit != "msg/s" else unit
    print(f"  {label}")
    print(f"    eventforge {statistics.median(ours) * scale:12,.1f} {shown}   "
          f"bare {statistics.median(bare) * scale:12,.1f} {shown}   (medians)")
    verdict = ""
    if target is not None:
        verdict = "  -> meets the >= 0.8x target" if median >= target \
            else "  -> BELOW the >= 0.8x target"
    print(f"    ratio {median:.2f}x [{min(ratios):.2f}-{max(ratios):.2f}] over {len(ratios)} "
          f"rounds{verdict}")
    return {"label": label, "median": median, "min": min(ratios), "max": max(ratios)}


def main(argv: Any = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds")
    args = parser.parse_args(argv)
    rounds, n, m = (3, 5_000, 100) if args.quick else (7, 30_000, 400)

    from eventforge_ext.nats import NatsTransport
    from eventforge_ext.redis import RedisTransport

    brokers = Brokers()
    results = []
    try:
        print(f"eventforge adapters vs bare clients ({rounds} alternating rounds; "
              f"{n} publishes, {m} requests per round; ratios >1 favour eventforge)")
        print(f"redis at {brokers.redis_url}")
        import redis

        transport = RedisTransport(url=brokers.redis_url)
        bare_client = redis.Redis.from_url(brokers.redis_url)
        results.append(report(
            "Redis publish throughput, same messages (send + flush vs pipelined PUBLISH "
            "of core-encoded Messages)",
            *alternate(rounds, lambda: ef_publish(transport, "bench.pub", n),
                       lambda: redis_bare_publish(bare_client, "bench.pub", n, message_body)),
            unit="msg/s", higher_better=True, target=TARGET))
        results.append(report(
            "Redis publish throughput, payload only (vs pipelined PUBLISH of json.dumps(payload))",
            *alternate(rounds, lambda: ef_publish(transport, "bench.pub", n),
                       lambda: redis_bare_publish(bare_client, "bench.pub", n, payload_body)),
            unit="msg/s", higher_better=True, target=None))
        responder = ef.MessageQueue(RedisTransport(url=brokers.redis_url))
        responder.subscribe("bench.rr", lambda msg: responder.reply(msg, msg.payload))
        requester = ef.MessageQueue(transport)
        bare_rr = RedisBareRequests(brokers.redis_url, "bench.bare.rr")
        results.append(report(
            "Redis request/reply p50 (MessageQueue.request vs PUBLISH + pubsub)",
            *alternate(rounds, lambda: ef_request_p50(requester, "bench.rr", m),
                       lambda: bare_rr.p50(m)),
            unit="s", higher_better=False, target=None))
        bare_rr.close()
        responder.close()
        requester.close()
        bare_client.close()

        print(f"nats at {brokers.nats_url}")
        transport = NatsTransport(brokers.nats_url)
        bare = NatsBare(brokers.nats_url)
        results.append(report(
            "NATS publish throughput, same messages (send + flush vs await publish of "
            "core-encoded Messages + flush)",
            *alternate(rounds, lambda: ef_publish(transport, "bench.pub", n),
                       lambda: bare.publish("bench.pub", n, message_body)),
            unit="msg/s", higher_better=True, target=TARGET))
        results.append(report(
            "NATS publish throughput, payload only (vs await publish of json.dumps(payload))",
            *alternate(rounds, lambda: ef_publish(transport, "bench.pub", n),
                       lambda: bare.publish("bench.pub", n, payload_body)),
            unit="msg/s", higher_better=True, target=None))
        responder = ef.MessageQueue(NatsTransport(brokers.nats_url))
        responder.subscribe("bench.rr", lambda msg: responder.reply(msg, msg.payload))
        requester = ef.MessageQueue(transport)
        bare.serve("bench.bare.rr")
        results.append(report(
            "NATS request/reply p50 (MessageQueue.request vs await nc.request)",
            *alternate(rounds, lambda: ef_request_p50(requester, "bench.rr", m),
                       lambda: bare.request_p50("bench.bare.rr", m)),
            unit="s", higher_better=False, target=None))
        bare.close()
        responder.close()
        requester.close()
    finally:
        brokers.stop()
    throughput = [r for r in results if "same messages" in r["label"]]
    met = all(r["median"] >= TARGET for r in throughput)
    print(f"verdict: publish throughput {'meets' if met else 'does NOT meet'} the >= {TARGET}x "
          f"target on {'both adapters' if met else 'at least one adapter'} "
          "(compared with the bare client sending the same Messages; the payload-only and "
          "request/reply p50 rows have no target and are shown for reference)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
