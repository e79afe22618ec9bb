"""What the comparison scripts in bench/ share: rounds, spreads, verdicts, tables.

A figure measured on a busy machine moves by tens of percent from one second
to the next, so every script here follows the same rules:

- eventforge and its baselines run in the *same* rounds, in a fresh random
  order each round (:func:`interleave`), never one after the other;
- a figure is reported as the median over the rounds with its min-max spread
  (:func:`spread`), never as the best of N alone;
- a ratio is taken per round, between two figures of that round
  (:func:`ratios`), and its median and spread are reported;
- a verdict is computed from the measured median against the target and
  printed with both (:func:`verdict`); no script states one by hand.

Latency samples of a round are reduced with :func:`percentile` (nearest rank),
the one percentile function of the bench scripts.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import sys
import time
import timeit
from typing import Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, TypeVar

T = TypeVar("T")

DEFAULT_ROUNDS = 7
QUICK_ROUNDS = 3


def percentile(samples: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0 < q <= 100) of ``samples`` by nearest rank.

    The smallest sample with at least ``q`` percent of the samples at or
    below it: always one of the samples, never an interpolation.
    """
    if not samples:
        raise ValueError("percentile of no samples")
    if not 0 < q <= 100:
        raise ValueError(f"q must be in (0, 100], not {q!r}")
    ordered = sorted(samples)
    rank = math.ceil(q / 100 * len(ordered))
    return ordered[max(rank, 1) - 1]


class Spread(NamedTuple):
    """Median and range of one figure over the rounds of a run."""

    median: float
    low: float
    high: float
    rounds: int


def spread(values: Sequence[float]) -> Spread:
    """Median, minimum and maximum of ``values`` (one value per round)."""
    if not values:
        raise ValueError("spread of no values")
    return Spread(statistics.median(values), min(values), max(values), len(values))


def ratios(values: Sequence[float], baseline: Sequence[float]) -> List[float]:
    """Per-round ratios ``values[i] / baseline[i]`` (both from the same rounds)."""
    if len(values) != len(baseline):
        raise ValueError("ratios need one value and one baseline per round")
    return [value / base for value, base in zip(values, baseline)]


def interleave(
    contenders: Mapping[str, Callable[[], T]], rounds: int, *, seed: Optional[int] = None
) -> Dict[str, List[T]]:
    """Run every contender once per round, in a fresh random order each round.

    Returns each contender's results, one per round.  Randomising the order
    keeps a contender from always running right after the same neighbour
    (a warm cache, a scheduler that just woke up): drifts in machine load land
    on all of them alike, and per-round ratios cancel most of it.
    """
    rng = random.Random(seed)
    names = list(contenders)
    results: Dict[str, List[T]] = {name: [] for name in names}
    for _ in range(rounds):
        rng.shuffle(names)
        for name in names:
            results[name].append(contenders[name]())
    return results


def time_calls(call: Callable[[int], object], count: int) -> List[float]:
    """Call ``call(i)`` for i in range(count); return each call's duration in seconds."""
    clock = time.perf_counter
    samples = []
    for i in range(count):
        started = clock()
        call(i)
        samples.append(clock() - started)
    return samples


def per_call(func: Callable[[], object], number: int) -> float:
    """Seconds per call of ``func`` over ``number`` calls (``timeit``: no GC meanwhile)."""
    return timeit.Timer(func).timeit(number) / number


def per_call_round(func: Callable[[], object], number: int, unit: float = 1.0
                   ) -> Callable[[], float]:
    """A contender for :func:`interleave`: each round is ``per_call(func, number) * unit``."""
    return lambda: per_call(func, number) * unit


def time_batch(run: Callable[[], object], ops: int) -> float:
    """Seconds per operation of one ``run()`` that performs ``ops`` operations."""
    started = time.perf_counter()
    run()
    return (time.perf_counter() - started) / ops


def _figure(value: float) -> str:
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _range(figure: Spread) -> str:
    return f"{_figure(figure.low)}..{_figure(figure.high)}"


def describe(values: Sequence[float], unit: str = "x") -> str:
    """``median<unit> [min..max]`` of ``values``, as the tables print it."""
    figure = spread(values)
    return f"{_figure(figure.median)}{unit} [{_range(figure)}]"


def row(
    label: str,
    values: Sequence[float],
    unit: str,
    baseline: Optional[Sequence[float]] = None,
    base_label: str = "",
) -> None:
    """Print one figure: median [min..max] over the rounds, and its per-round ratio.

    With ``baseline`` (a figure from the same rounds) the line adds the median
    ratio ``values / baseline`` and that ratio's range.
    """
    figure = spread(values)
    text = f"  {label:<46} {_figure(figure.median):>9} {unit:<6}"
    if figure.rounds > 1:
        text += f" [{_range(figure)}]"
    if baseline is not None:
        ratio = spread(ratios(values, baseline))
        text = f"{text:<86} {ratio.median:5.2f}x {base_label} [{ratio.low:.2f}..{ratio.high:.2f}]"
    print(text.rstrip(), flush=True)


def verdict(what: str, values: Sequence[float], target: float, *, at_most: bool = True,
            unit: str = "x") -> bool:
    """Print the target, the measured median (with its range) and the computed verdict.

    The verdict follows the median; when the range over the rounds crosses
    the target the line says so, since the run then cannot tell.
    """
    figure = spread(values)
    meets = figure.median <= target if at_most else figure.median >= target
    sign = "<=" if at_most else ">="
    both_sides = (figure.low <= target) != (figure.high <= target)
    note = " (the rounds fall on both sides of the target)" if both_sides else ""
    print(
        f"  -> {what}: target {sign} {target:g}{unit}, measured median "
        f"{describe(values, unit)} over {figure.rounds} rounds: "
        f"{'meets' if meets else 'MISSES'}{note}",
        flush=True,
    )
    return meets


def cpu_list(text: str) -> List[int]:
    """CPUs named like ``0``, ``0,1`` or ``0-3`` (as taskset takes them)."""
    cpus: List[int] = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        cpus.extend(range(int(first), int(last or first) + 1))
    if not cpus:
        raise ValueError(f"no CPU in {text!r}")
    return cpus


class _PinAction(argparse.Action):
    """``--cpus``: pin this process, and so every process it starts later, at parse time."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: Optional[str] = None) -> None:
        try:
            cpus = cpu_list(str(values))
            os.sched_setaffinity(0, cpus)  # type: ignore[attr-defined]
        except (ValueError, OSError, AttributeError) as exc:
            parser.error(f"--cpus {values}: {exc}")
        setattr(namespace, self.dest, cpus)


def parser(doc: Optional[str]) -> argparse.ArgumentParser:
    """The command line every script takes: ``--quick``, ``--rounds N`` and ``--cpus``."""
    first_line = (doc or "").strip().split("\n")[0]
    parser = argparse.ArgumentParser(description=first_line)
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: less work per round, {QUICK_ROUNDS} rounds")
    parser.add_argument("--rounds", type=int, default=None,
                        help=f"rounds per figure (default {DEFAULT_ROUNDS}, "
                             f"{QUICK_ROUNDS} with --quick)")
    parser.add_argument("--cpus", action=_PinAction, default=None, metavar="LIST",
                        help="run on these CPUs only (e.g. 0 or 0,1), this process and the "
                             "ones it starts: steadier figures than letting the scheduler "
                             "move them (Linux)")
    return parser


def rounds_of(args: argparse.Namespace) -> int:
    """The number of rounds asked for on the command line."""
    if args.rounds is not None:
        if args.rounds < 1:
            raise SystemExit("--rounds must be at least 1")
        return int(args.rounds)
    return QUICK_ROUNDS if args.quick else DEFAULT_ROUNDS


def header(title: str, version: str, rounds: int) -> None:
    """Print what ran where, with the load at the start (the machine may be shared)."""
    load = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    cpus = f"{os.cpu_count()} CPUs"
    if hasattr(os, "sched_getaffinity") and len(os.sched_getaffinity(0)) != os.cpu_count():
        cpus += f" (pinned to {','.join(map(str, sorted(os.sched_getaffinity(0))))})"
    print(f"eventforge {version} {title}, Python {sys.version.split()[0]}, "
          f"{cpus}, load average {load}")
    print(f"each figure: median [min..max] over {rounds} rounds; eventforge and its "
          "baselines alternate in random order every round; ratios are per round")
