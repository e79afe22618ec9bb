"""The helpers every bench script shares (bench/_common.py): percentile, spread, verdicts.

The scripts themselves are not run here (they take seconds to minutes and
need the benchmark peers); what they compute their figures with is.
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench"))

import _common as bench  # noqa: E402


def test_percentile_is_nearest_rank():
    samples = [5.0, 1.0, 4.0, 2.0, 3.0]  # unsorted on purpose
    assert bench.percentile(samples, 50) == 3.0
    assert bench.percentile(samples, 20) == 1.0
    assert bench.percentile(samples, 21) == 2.0
    assert bench.percentile(samples, 100) == 5.0
    assert bench.percentile(samples, 0.001) == 1.0
    hundred = list(range(1, 101))
    assert bench.percentile(hundred, 99) == 99
    assert bench.percentile(hundred, 50) == 50
    assert bench.percentile([7.0], 99) == 7.0


@pytest.mark.parametrize("q", [0, -1, 100.5])
def test_percentile_rejects_a_q_out_of_range(q):
    with pytest.raises(ValueError, match="q must be"):
        bench.percentile([1.0], q)


def test_percentile_and_spread_refuse_no_samples():
    with pytest.raises(ValueError):
        bench.percentile([], 50)
    with pytest.raises(ValueError):
        bench.spread([])


def test_spread_and_per_round_ratios():
    assert bench.spread([3.0, 1.0, 2.0, 10.0]) == bench.Spread(2.5, 1.0, 10.0, 4)
    assert bench.ratios([2.0, 9.0], [1.0, 3.0]) == [2.0, 3.0]
    with pytest.raises(ValueError, match="one value and one baseline per round"):
        bench.ratios([1.0, 2.0], [1.0])


def test_interleave_runs_every_contender_once_per_round_in_varying_order():
    calls = []

    def contender(name):
        def run():
            calls.append(name)
            return len(calls)
        return run

    got = bench.interleave({name: contender(name) for name in "abc"}, rounds=20, seed=1)
    assert [len(values) for values in got.values()] == [20, 20, 20]
    rounds = [tuple(calls[i:i + 3]) for i in range(0, 60, 3)]
    assert all(sorted(order) == ["a", "b", "c"] for order in rounds)
    assert len(set(rounds)) > 1, "the order must change between rounds"
    # Each result is recorded against the contender that produced it.
    for name, values in got.items():
        assert all(calls[value - 1] == name for value in values)


def test_verdict_is_computed_from_the_median(capsys):
    assert bench.verdict("x / y", [1.0, 1.1, 1.2], 1.15) is True
    line = capsys.readouterr().out
    assert "target <= 1.15x" in line and "measured median 1.10x [1.00..1.20]" in line
    assert "meets (the rounds fall on both sides of the target)" in line

    assert bench.verdict("x / y", [1.3, 1.4, 1.5], 1.15) is False
    line = capsys.readouterr().out
    assert line.rstrip().endswith("MISSES")

    assert bench.verdict("rate", [0.9, 0.95, 0.99], 1.0, at_most=False) is False
    assert "target >= 1x" in capsys.readouterr().out
    assert bench.verdict("p50", [4.0, 5.0, 6.0], 10, unit=" us") is True
    assert "target <= 10 us, measured median 5.00 us [4.00..6.00]" in capsys.readouterr().out


def test_row_prints_the_median_range_and_per_round_ratio(capsys):
    bench.row("ours", [2.0, 4.0, 3.0], "us", [1.0, 2.0, 2.0], "floor")
    line = capsys.readouterr().out
    assert "3.00 us" in line and "[2.00..4.00]" in line
    assert "2.00x floor [1.50..2.00]" in line  # per-round ratios 2.0, 2.0, 1.5
    bench.row("once", [12.5], "MB")
    assert capsys.readouterr().out.rstrip().endswith("12.50 MB")  # no range for one value


def test_cpu_list_reads_taskset_style_lists():
    assert bench.cpu_list("0") == [0]
    assert bench.cpu_list("0,1") == [0, 1]
    assert bench.cpu_list("0-2,5") == [0, 1, 2, 5]
    with pytest.raises(ValueError):
        bench.cpu_list("x")


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity here")
def test_cpus_pins_the_process_when_parsed_and_the_header_says_so(capsys):
    before = os.sched_getaffinity(0)
    first = min(before)
    try:
        args = bench.parser("demo").parse_args(["--cpus", str(first)])
        assert args.cpus == [first]
        assert os.sched_getaffinity(0) == {first}
        bench.header("demo", "0", 3)
        if len(before) > 1:
            assert f"(pinned to {first})" in capsys.readouterr().out
    finally:
        os.sched_setaffinity(0, before)


def test_cpus_refuses_a_bad_list():
    with pytest.raises(SystemExit):
        bench.parser("demo").parse_args(["--cpus", "x"])
