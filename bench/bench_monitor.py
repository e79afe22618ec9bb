"""Does the monitor slow the hot path?  Publishing with the monitor on and off, in one run.

    python bench/bench_monitor.py            # 15 rounds
    python bench/bench_monitor.py --quick    # 3 short rounds (smoke run)

Rows (issue 13):
  pub_local  MessageQueue.publish to one subscriber, per message;
  pub_tcp    a client publishes N messages to a TCPServerTransport whose
             subscriber counts them, per message until the last arrived.

Each row is measured two ways, alternating round by round (the order
flips, so neither always runs first):
  off   components without a monitor;
  on    the same components watched by a started Monitor that a thread
        scrapes (/metrics, /varz and /connz) every --scrape-interval seconds
        all through the run (Prometheus's default is 15 s; 1 s here).

The scraper runs in this process, so its CPU time lands on whichever round
runs meanwhile, "off" included: the on/off ratio shows what the monitor adds
to publishing itself, and the time one scrape takes is printed beside it
(what a scrape costs the process, once per interval).

The verdict compares the mean of the fastest third of each variant's rounds
(the least disturbed by other work on the machine): within noise when the
difference is no larger than the spread of that fastest third of "off"
((max - min) / min), or 3 %, whichever is larger.  The median, min and max
of all rounds are printed too; on a shared machine, read the spread first.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
import urllib.request
from typing import Any, Callable, Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import eventforge as ef  # noqa: E402

VARIANTS = ("off", "on")


class Scraper:
    """Fetches monitor endpoints every ``interval`` seconds on its own thread."""

    def __init__(self, url: str, interval: float) -> None:
        self.url = url
        self.interval = interval
        self.scrapes = 0
        self.seconds: List[float] = []  # wall time of each scrape (three requests)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> Scraper:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="bench-scraper", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(10)

    def _run(self) -> None:
        while True:
            started = time.perf_counter()
            for path in ("metrics", "varz", "connz"):
                with urllib.request.urlopen(self.url + path, timeout=10) as response:
                    response.read()
            self.seconds.append(time.perf_counter() - started)
            self.scrapes += 1
            if self._stop.wait(self.interval):
                return


class Setup:
    """Components to publish through, and the monitor watching them (or None)."""

    queue: ef.MessageQueue
    monitor: Optional[ef.Monitor] = None

    def publish(self, count: int) -> float:
        """Publish ``count`` messages; returns when it started (perf_counter)."""
        publish = self.queue.publish
        started = time.perf_counter()
        for _ in range(count):
            publish("orders.created", 1)
        return started

    def close(self) -> None:
        if self.monitor is not None:
            self.monitor.close()
        self.queue.close()


class LocalSetup(Setup):
    """pub_local: a MessageQueue with one subscriber."""

    def __init__(self, monitored: bool) -> None:
        self.queue = ef.MessageQueue()
        self.seen = 0
        self.queue.subscribe("orders.created", self._on)
        self.monitor = ef.Monitor(port=0, components=[self.queue]).start() if monitored else None

    def _on(self, message: ef.Message) -> None:
        self.seen += 1

    def run(self, count: int) -> float:
        started = self.publish(count)
        return (time.perf_counter() - started) / count * 1e9


class TCPSetup(Setup):
    """pub_tcp: client -> server, the server's subscriber counts arrivals."""

    def __init__(self, monitored: bool) -> None:
        self.server = ef.TCPServerTransport("127.0.0.1", 0).start()
        self.server_queue = ef.MessageQueue(self.server)
        self.lock = threading.Lock()
        self.seen = 0
        self.target = 0
        self.done = threading.Event()
        self.server_queue.subscribe("orders.created", self._on)
        self.client = ef.TCPClientTransport("127.0.0.1", self.server.port).connect(10)
        self.queue = ef.MessageQueue(self.client)
        self.monitor = (ef.Monitor(port=0, components=[self.server_queue]).start()
                        if monitored else None)
        # Interest and routes settle with one round trip before timing.
        self.server_queue.subscribe("ping", lambda m: self.server_queue.reply(m, "pong"))
        assert self.queue.request("ping", None, timeout=10) is not None

    def _on(self, message: ef.Message) -> None:
        with self.lock:
            self.seen += 1
            if self.seen >= self.target:
                self.done.set()

    def run(self, count: int) -> float:
        with self.lock:
            self.seen = 0
            self.target = count
            self.done.clear()
        started = self.publish(count)
        if not self.done.wait(60):
            raise RuntimeError(f"only {self.seen} of {count} messages arrived")
        return (time.perf_counter() - started) / count * 1e9

    def close(self) -> None:
        super().close()
        self.server_queue.close()


def scrape_once(url: str) -> float:
    started = time.perf_counter()
    for path in ("metrics", "varz", "connz"):
        with urllib.request.urlopen(url + path, timeout=10) as response:
            response.read()
    return time.perf_counter() - started


def measure(make: Callable[[bool], Any], count: int, rounds: int,
            interval: float) -> Tuple[Dict[str, List[float]], List[float], float]:
    setups = {"off": make(False), "on": make(True)}
    results: Dict[str, List[float]] = {v: [] for v in VARIANTS}
    try:
        for setup in setups.values():  # warm up
            setup.run(count // 10)
        idle = statistics.median(scrape_once(setups["on"].monitor.url) for _ in range(9))
        with Scraper(setups["on"].monitor.url, interval) as scraper:
            for r in range(rounds):
                for variant in (VARIANTS if r % 2 == 0 else VARIANTS[::-1]):
                    results[variant].append(setups[variant].run(count))
        if not scraper.scrapes:
            raise RuntimeError("the scraper never scraped")
    finally:
        for setup in setups.values():
            setup.close()
    return results, scraper.seconds, idle


def fast_third(values: List[float]) -> List[float]:
    """The fastest third of the rounds: those least disturbed by other work."""
    ordered = sorted(values)
    return ordered[:max(1, len(ordered) // 3)]


def report(name: str, results: Dict[str, List[float]], scrapes: List[float],
           idle: float) -> bool:
    off_fast = fast_third(results["off"])
    base = statistics.mean(off_fast)
    # Noise: how far apart the least disturbed "off" rounds themselves are.
    noise = max((max(off_fast) - min(off_fast)) / min(off_fast), 0.03)
    print(f"\n{name}: ns per message, {len(results['off'])} rounds; compared on the mean of "
          f"the fastest third (noise band {noise * 100:.1f} %)")
    ok = True
    for variant in VARIANTS:
        values = results[variant]
        fast = statistics.mean(fast_third(values))
        ratio = fast / base
        within = abs(ratio - 1) <= noise
        if variant != "off":
            ok = ok and within
        verdict = "" if variant == "off" else (
            "  within noise" if within else "  OUTSIDE noise")
        print(f"  {variant:<4} fastest third {fast:7.0f}  median {statistics.median(values):7.0f}"
              f"  min {min(values):7.0f}  max {max(values):7.0f}   {ratio:4.2f}x off{verdict}")
    print(f"  one scrape (/metrics + /varz + /connz): {idle * 1e3:.1f} ms with nothing else "
          f"running; {statistics.median(scrapes) * 1e3:.1f} ms (median of {len(scrapes)}) "
          f"while the rounds ran (waiting for the GIL)")
    return ok


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 short rounds")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--scrape-interval", type=float, default=1.0, metavar="S")
    args = parser.parse_args(argv)
    rounds = 3 if args.quick else args.rounds
    local_n, tcp_n = (5_000, 2_000) if args.quick else (100_000, 20_000)
    print(f"eventforge {ef.__version__}, Python {sys.version.split()[0]}, "
          f"{os.cpu_count()} CPUs; scraped = every {args.scrape_interval} s")
    ok = report("pub_local", *measure(LocalSetup, local_n, rounds, args.scrape_interval))
    ok = report("pub_tcp", *measure(TCPSetup, tcp_n, rounds, args.scrape_interval)) and ok
    print("\nverdict: the monitor " + ("leaves the hot path unchanged (within noise)" if ok
                                      else "moved a figure outside the noise band"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
