"""Observers (section 9): events, dispatchers, Node, contexts, meters, reporters."""

from __future__ import annotations

import concurrent.futures as cf
import logging
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import eventforge as ef
from eventforge import (
    BroadcastDispatcher,
    ConcurrentDispatcher,
    CPUMeter,
    Eventful,
    ExecutionMode,
    Executor,
    LeastLoadedDispatcher,
    LoggingReporter,
    MemoryMeter,
    Meter,
    MetricsMeter,
    Node,
    Observable,
    Reporter,
    RoundRobinDispatcher,
    SharedState,
    TaskContext,
    TimingMeter,
    observe,
    task,
)


@pytest.fixture(autouse=True)
def _leaks(no_leaks):
    yield


def _in_threads(target, count):
    """Run ``target`` on ``count`` threads at once and wait for them all."""
    threads = [threading.Thread(target=target) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


# -- Eventful -------------------------------------------------------------------------


def test_eventful_subscribe_fire_unsubscribe():
    event = Eventful()
    seen = []
    first = event.subscribe(lambda x: seen.append(("a", x)) or "A")

    @event.on
    def second(x):
        seen.append(("b", x))
        return "B"

    assert event.subscribers == (first, second)
    assert event.fire(1) == ["A", "B"]
    assert seen == [("a", 1), ("b", 1)]
    assert event.unsubscribe(first) is True
    assert event.unsubscribe(first) is False
    assert event.fire(2) == ["B"]
    assert isinstance(event.dispatcher, BroadcastDispatcher)
    with pytest.raises(TypeError):
        event.subscribe("not callable")


def test_broadcast_runs_earlier_subscribers_then_propagates_the_first_error():
    event = Eventful()
    ran = []
    event.subscribe(lambda: ran.append(1))
    event.subscribe(lambda: (_ for _ in ()).throw(ValueError("second fails")))
    event.subscribe(lambda: ran.append(3))
    with pytest.raises(ValueError, match="second fails"):
        event.fire()
    assert ran == [1]


def test_a_subscriber_may_unsubscribe_while_firing():
    event = Eventful()
    ran = []

    def once():
        ran.append("once")
        event.unsubscribe(once)

    event.subscribe(once)
    event.subscribe(lambda: ran.append("always"))
    event.fire()
    event.fire()
    assert ran == ["once", "always", "always"]


# -- Observable -------------------------------------------------------------------------


class Door(Observable):
    EVENTS = ("opened", "closed")


class SlidingDoor(Door):
    EVENTS = ("jammed",)


def test_observable_on_fire_events():
    door = SlidingDoor()
    seen = []
    door.on("opened", lambda who: seen.append(who))

    @door.on("jammed")
    def jammed(who):
        seen.append(("jammed", who))

    door.fire("opened", "alice")
    door.fire("jammed", "bob")
    door.fire("closed", "nobody listens")
    assert seen == ["alice", ("jammed", "bob")]
    assert SlidingDoor.events() == ("opened", "closed", "jammed")
    assert door.events() == SlidingDoor.events()
    assert door.off("jammed", jammed) is True
    door.fire("jammed", "carol")
    assert seen == ["alice", ("jammed", "bob")]


def test_unknown_event_names_the_class():
    door = Door()
    for action in (lambda: door.on("exploded", print), lambda: door.fire("exploded"),
                   lambda: door.off("exploded", print)):
        with pytest.raises(AttributeError, match=r"Door has no event 'exploded'"):
            action()


def test_event_dispatcher_can_be_swapped():
    door = Door()
    door.event("opened").dispatcher = RoundRobinDispatcher()
    seen = []
    door.on("opened", lambda: seen.append("a"))
    door.on("opened", lambda: seen.append("b"))
    for _ in range(4):
        door.fire("opened")
    assert seen == ["a", "b", "a", "b"]


# -- class-level subscriptions --------------------------------------------------------------


class DoorWatcher(Reporter):
    def __init__(self, **kw):
        self.seen = []
        super().__init__(**kw)

    @observe(Door, "opened")
    @observe(Door, "closed")
    def any_door(self, who):
        self.seen.append(who)


def test_reporter_receives_events_of_every_instance_and_subclass():
    watcher = DoorWatcher()
    try:
        Door().fire("opened", "a")
        SlidingDoor().fire("closed", "b")
        Door().fire("closed", "c")
        assert sorted(watcher.seen) == ["a", "b", "c"]
    finally:
        watcher.unregister()
    Door().fire("opened", "after")
    assert "after" not in watcher.seen
    assert not watcher.registered


def test_reporter_is_strong_by_default_and_weak_on_request():
    import gc

    seen = []

    class Collector(Reporter):
        @observe(Door, "opened")
        def got(self, who):
            seen.append(who)

    strong = Collector()
    weak = Collector(weak=True)
    del weak
    gc.collect()
    try:
        Door().fire("opened", "x")
        # Only the strong one is left: nobody holds it, yet it still reports.
        assert seen == ["x"]
    finally:
        strong.unregister()
    Door().fire("opened", "y")
    assert seen == ["x"]


def test_reporter_as_context_manager_unregisters():
    with DoorWatcher() as watcher:
        Door().fire("opened", 1)
    Door().fire("opened", 2)
    assert watcher.seen == [1]


def test_observe_mark_checks_its_target():
    with pytest.raises(AttributeError, match="Door has no event 'nope'"):
        observe(Door, "nope")
    with pytest.raises(TypeError):
        observe(int, "real")


# -- dispatchers ---------------------------------------------------------------------------


def test_round_robin_rotation_is_stable_when_members_change():
    rr = RoundRobinDispatcher()
    calls = []

    def member(name):
        def fn():
            calls.append(name)
        fn.__name__ = name
        return fn

    a, b, c, d = (member(n) for n in "abcd")
    rr.dispatch((a, b, c))          # a
    rr.dispatch((a, b, c))          # b
    rr.dispatch((a, b, c, d))       # c: adding d does not restart the turn
    rr.dispatch((a, b, d))          # c left after serving: d comes next
    rr.dispatch((a, b, d))          # a
    rr.dispatch((b, d))             # a left: its successor b is not skipped
    assert calls == ["a", "b", "c", "d", "a", "b"]
    assert rr.dispatch(()) is None


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=6), min_size=1, max_size=8))
def test_round_robin_serves_everyone_equally_between_changes(sizes):
    # Property: for any fixed membership, n consecutive firings reach each of n members once.
    rr = RoundRobinDispatcher()
    pool = []
    for size in sizes:
        while len(pool) < size:
            index = len(pool)
            pool.append(lambda i=index: i)
        del pool[size:]
        members = tuple(pool)
        got = [rr.dispatch(members) for _ in range(len(members))]
        assert sorted(got) == list(range(len(members)))


def test_concurrent_dispatcher_with_futures_executor_logs_errors(caplog):
    seen = []

    def bad():
        raise RuntimeError("subscriber broke")

    with cf.ThreadPoolExecutor(2) as pool:
        futures = ConcurrentDispatcher(pool).dispatch((lambda: seen.append(1) or 1, bad))
        assert futures[0].result(5) == 1
        with pytest.raises(RuntimeError, match="subscriber broke"):
            futures[1].result(5)
    assert any("subscriber broke" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("mode", [ExecutionMode.SEQUENTIAL, ExecutionMode.THREAD])
def test_concurrent_dispatcher_with_eventforge_executor(mode, caplog):
    def bad(x):
        raise ValueError(f"bad {x}")

    with Executor(mode=mode, max_workers=2) as executor:
        futures = ConcurrentDispatcher(executor).dispatch((lambda x: x * 2, bad), 21)
        assert futures[0].result(5) == 42
        with pytest.raises(ValueError, match="bad 21"):
            futures[1].result(5)
        assert executor.stats["uncollected"] == 0  # nothing piles up in the executor
    assert any("bad 21" in r.getMessage() for r in caplog.records)
    with pytest.raises(TypeError):
        ConcurrentDispatcher(object())


def test_eventful_with_concurrent_dispatcher_runs_in_parallel():
    barrier = threading.Barrier(3, timeout=5)
    with cf.ThreadPoolExecutor(3) as pool:
        event = Eventful(ConcurrentDispatcher(pool))
        for _ in range(3):
            event.subscribe(barrier.wait)  # would time out if run one by one
        for future in event.fire():
            future.result(5)


# -- Node and LeastLoadedDispatcher -------------------------------------------------------------


def test_node_capacity_rules():
    assert Node("a", cpus=16).capacity == 4
    assert Node("b", cpus=2).capacity == 1
    assert Node("c", cpus=0).capacity == 1
    assert Node("d", cpus=64, gpus=2).capacity == 2
    with pytest.raises(ValueError):
        Node("e", cpus=-1)


def test_node_acquire_release_is_floored():
    node = Node("n", cpus=8, memory_gb=16, gpus=0, handler=lambda x: x + 1)
    assert node.capacity == 2 and node.load() == 0.0
    assert node.try_acquire() and node.try_acquire()
    assert node.load() == 1.0
    assert not node.try_acquire()
    node.release()
    node.release()
    node.release()  # one too many: stays at zero
    assert node.active == 0 and node.load() == 0.0
    assert node(1) == 2 and node.active == 0


def test_node_counts_direct_calls_while_running():
    loads = []
    node = Node("n", cpus=4, handler=lambda: loads.append(node.load()))
    node()
    assert loads == [1.0] and node.active == 0
    with pytest.raises(TypeError):
        Node("empty")()


def test_node_acquire_is_atomic_under_contention():
    node = Node("n", cpus=12)  # capacity 3
    won = []
    barrier = threading.Barrier(8)

    def grab():
        barrier.wait()
        if node.try_acquire():
            won.append(1)

    _in_threads(grab, 8)
    assert len(won) == 3 and node.active == 3


def test_least_loaded_routes_returns_result_and_reads_load_one():
    loads = []
    node = Node("gpu", gpus=1, handler=lambda x: loads.append(node.load()) or x * 10)
    dispatcher = LeastLoadedDispatcher([node])
    assert dispatcher.route(4) == 40
    assert loads == [1.0]  # reserved once, not counted again by the call
    assert node.active == 0


def test_least_loaded_prefers_the_emptier_node_and_saturates():
    release = threading.Event()
    started = threading.Semaphore(0)

    def slow(name):
        started.release()
        release.wait(5)
        return name

    a = Node("a", cpus=4, handler=lambda: slow("a"))   # capacity 1
    b = Node("b", cpus=8, handler=lambda: slow("b"))   # capacity 2
    dispatcher = LeastLoadedDispatcher([a, b])
    results = []
    threads = [threading.Thread(target=lambda: results.append(dispatcher.route()))
               for _ in range(3)]
    for t in threads:
        t.start()
        assert started.acquire(timeout=5)
    try:
        assert a.load() == 1.0 and b.load() == 1.0
        with pytest.raises(RuntimeError, match="saturated"):
            dispatcher.route()
    finally:
        release.set()
        for t in threads:
            t.join()
    assert sorted(results) == ["a", "b", "b"]
    assert a.active == b.active == 0


def test_least_loaded_releases_on_handler_error_and_as_event_dispatcher():
    node = Node("n", cpus=4, handler=lambda: 1 / 0)
    dispatcher = LeastLoadedDispatcher()
    dispatcher.add(node)
    with pytest.raises(ZeroDivisionError):
        dispatcher.route()
    assert node.active == 0
    event = Eventful(LeastLoadedDispatcher())
    event.subscribe(Node("x", handler=lambda v: ("x", v)))
    assert event.fire(3) == ("x", 3)
    assert dispatcher.remove(node) and not dispatcher.remove(node)
    with pytest.raises(RuntimeError, match="saturated"):
        dispatcher.route()
    with pytest.raises(TypeError):
        LeastLoadedDispatcher().dispatch((print,))


# -- contexts and shared state -------------------------------------------------------------------


def test_task_context_execution_time_never_negative(monkeypatch):
    ctx = TaskContext("t", "id-1", (1,), {"k": 2})
    assert ctx.execution_time >= 0.0
    ctx.stop_clock()
    assert ctx.execution_time >= 0.0 and ctx.end_time >= ctx.start_time - 1.0
    readings = iter([1000.0, 900.0])  # started, then stopped 100 s *earlier*
    monkeypatch.setattr(ef, "_perf_counter", lambda: next(readings))
    ctx.restart_clock()
    ctx.stop_clock()
    monkeypatch.undo()
    assert ctx.execution_time == 0.0
    assert ctx.task_id == "id-1" and ctx.args == (1,) and ctx.kwargs == {"k": 2}
    assert "TaskContext t id-1" in repr(ctx)
    assert isinstance(ctx, ef.ExecutionContext)


def test_shared_state_operations():
    state = SharedState({"a": 1})
    state.set("b", 2)
    assert state.get("a") == 1 and state.get("zz", "d") == "d"
    assert state.contains("b") and "b" in state and "c" not in state
    assert state.update("a", lambda v: v + 10) == 11
    assert state.update("n", lambda v: v + 1, 0) == 1
    state.update({"x": 1}, y=2)
    assert sorted(state.items()) == [("a", 11), ("b", 2), ("n", 1), ("x", 1), ("y", 2)]
    assert state.delete("x") is True and state.delete("x") is False
    state["z"] = 3
    assert state["z"] == 3 and len(state) == 5
    state.clear()
    assert len(state) == 0 and state.items() == []


def test_shared_state_update_is_atomic():
    state = SharedState()

    def bump():
        for _ in range(2000):
            state.update("n", lambda v: v + 1, 0)

    _in_threads(bump, 4)
    assert state.get("n") == 8000


# -- meters ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction, expected", [
    ("mean", 2.5), ("max", 4), ("min", 1), ("sum", 10), ("last", 4), ("count", 4)])
def test_meter_reductions(reduction, expected):
    meter = Meter("m", reduction=reduction)
    for v in (1, 2, 3, 4):
        meter.update(v)
    assert meter.value == expected
    assert meter.stats == {"value": expected, "count": 4}
    assert (meter.count, meter.sum, meter.last, meter.min_val, meter.max_val) == (4, 10, 4, 1, 4)


def test_meter_update_with_weight_reset_and_empty():
    meter = Meter()
    assert meter.name == "Meter" and meter.reduction == "mean"
    assert meter.value is None and meter.stats == {"value": None, "count": 0}
    meter.update(2.0, n=3)
    meter.update(6.0)
    assert meter.count == 4 and meter.value == 3.0
    meter.reset()
    assert meter.stats == {"value": None, "count": 0} and meter.sum == 0.0
    with pytest.raises(ValueError):
        meter.update(1, n=0)


def test_unknown_reduction_lists_the_choices():
    with pytest.raises(ValueError, match="mean, max, min, sum, last, count"):
        Meter(reduction="median")


def test_concurrent_updates_lose_nothing():
    meter = Meter(reduction="sum")
    barrier = threading.Barrier(4)

    def work():
        barrier.wait()
        for _ in range(5000):
            meter.update(1)

    _in_threads(work, 4)
    assert meter.count == 20000 and meter.value == 20000


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(min_value=-1e6, max_value=1e6), min_size=1, max_size=30))
def test_meter_matches_a_reference(values):
    meters = {r: Meter(reduction=r) for r in Meter.REDUCTIONS}
    for v in values:
        for meter in meters.values():
            meter.update(v)
    assert meters["max"].value == max(values)
    assert meters["min"].value == min(values)
    assert meters["last"].value == values[-1]
    assert meters["count"].value == len(values)
    assert meters["sum"].value == pytest.approx(sum(values), abs=1e-6)
    assert meters["mean"].value == pytest.approx(sum(values) / len(values), abs=1e-6)


def test_measurement_event_and_attach_to_another_meter():
    timing = TimingMeter()
    slowest = Meter("slowest", reduction="max")
    slowest.attach(timing)
    events = []
    timing.on("measurement", lambda meter, value, ctx: events.append((meter, value, ctx)))
    timing.update(0.5)
    timing.update(0.2)
    assert slowest.value == 0.5 and slowest.count == 2
    assert [(m, v, c) for m, v, c in events] == [(timing, 0.5, None), (timing, 0.2, None)]
    with pytest.raises(TypeError):
        Meter().attach(42)


def test_meter_attach_to_a_task_and_hooks():
    meter = MetricsMeter()

    @task()
    def double(x):
        return 2 * x

    assert meter.attach(double) is double
    double(1)
    assert meter.stats == {"calls": 1, "successes": 1, "failures": 0}
    ctx = TaskContext("t")
    base = Meter()
    for hook in (base.on_start, base.on_success, base.on_failure, base.on_complete):
        hook(ctx)  # the base meter measures nothing by itself
    assert base.count == 0


def test_timing_meter_stats_and_threshold(caplog):
    timing = TimingMeter(threshold=0.05, name="slow-check")
    alerts = []
    timing.on("threshold_exceeded", lambda meter, elapsed, ctx: alerts.append(ctx.task_name))

    @task(on_execute=[timing])
    def nap(seconds):
        time.sleep(seconds)
        return seconds

    with caplog.at_level(logging.WARNING, logger="eventforge"):
        nap(0)
        nap(0.1)
    stats = timing.stats
    assert stats["count"] == 2 and stats["over_threshold"] == 1
    assert set(stats) >= {"count", "avg", "min", "max", "total", "value"}
    assert stats["min"] < 0.05 <= stats["max"]
    assert stats["total"] == pytest.approx(stats["min"] + stats["max"])
    assert stats["avg"] == pytest.approx(stats["total"] / 2)
    assert alerts == ["nap"]
    assert any("over the 0.050000 s threshold" in r.getMessage() for r in caplog.records)
    timing.reset()
    assert timing.stats["count"] == 0 and timing.stats["over_threshold"] == 0
    with pytest.raises(ValueError):
        TimingMeter(threshold=-1)


def test_memory_meter_measures_peak_and_stops_tracing():
    import tracemalloc

    assert not tracemalloc.is_tracing()
    memory = MemoryMeter()
    assert memory.reduction == "max"

    @task(on_execute=[memory])
    def allocate(n):
        assert tracemalloc.is_tracing()
        block = bytearray(n)
        return len(block)

    allocate(1_000_000)
    allocate(10)
    assert memory.count == 2
    assert memory.max_val >= 1_000_000 > memory.min_val
    assert not tracemalloc.is_tracing()  # costs nothing between calls


def test_memory_meter_leaves_foreign_tracing_alone():
    import tracemalloc

    tracemalloc.start()
    try:
        memory = MemoryMeter()
        observe(memory)(lambda: bytearray(1000))()
        assert tracemalloc.is_tracing() and memory.count == 1
    finally:
        tracemalloc.stop()


def test_memory_meter_overlapping_calls_report_an_upper_bound():
    import tracemalloc

    memory = MemoryMeter()
    inside = threading.Barrier(2, timeout=5)

    @task(on_execute=[memory])
    def allocate(n):
        block = bytearray(n)
        inside.wait()
        return len(block)

    threads = [threading.Thread(target=allocate, args=(n,)) for n in (500_000, 10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert memory.count == 2 and memory.max_val >= 500_000
    assert not tracemalloc.is_tracing()


def test_cpu_meter_counts_cpu_not_sleep():
    cpu = CPUMeter()

    @task(on_execute=[cpu])
    def spin(seconds):
        end = time.thread_time() + seconds
        while time.thread_time() < end:
            pass

    @task(on_execute=[cpu])
    def sleep(seconds):
        time.sleep(seconds)

    spin(0.05)
    assert cpu.last >= 0.04
    sleep(0.2)
    assert cpu.last < 0.1
    assert cpu.count == 2 and cpu.reduction == "mean"


def test_metrics_meter_counts_and_extracts():
    counts = MetricsMeter()
    sizes = MetricsMeter("size", lambda result: len(result), reduction="sum")

    @task(on_execute=[counts, sizes])
    def echo(text):
        if text == "boom":
            raise ValueError(text)
        return text

    echo("ab")
    echo("abcd")
    with pytest.raises(ValueError):
        echo("boom")
    assert counts.stats == {"calls": 3, "successes": 2, "failures": 1}
    assert sizes.stats == {"value": 6, "count": 2, "calls": 3, "successes": 2, "failures": 1}
    counts.reset()
    assert counts.stats == {"calls": 0, "successes": 0, "failures": 0}
    with pytest.raises(TypeError):
        MetricsMeter("x", extract=5)


# -- reporters and observe ---------------------------------------------------------------------


def test_logging_reporter_logs_measurements_and_outcomes(caplog):
    reporter = LoggingReporter(level=logging.INFO, log_args=True, log_result=True,
                               logger_name="test.reporter")
    timing = TimingMeter(name="t1")
    try:
        @task(on_execute=[timing, reporter])
        def add(a, b):
            if a < 0:
                raise ValueError("negative")
            return a + b

        with caplog.at_level(logging.INFO, logger="test.reporter"):
            add(1, 2)
            with pytest.raises(ValueError):
                add(-1, 2)
    finally:
        reporter.unregister()
    lines = [r.getMessage() for r in caplog.records if r.name == "test.reporter"]
    assert any(line.startswith("meter=t1 value=") and "task=add" in line
               and "args=(1, 2)" in line for line in lines)
    assert any("task=add" in line and "succeeded" in line and "result=3" in line
               for line in lines)
    failed = [r for r in caplog.records if r.name == "test.reporter" and "failed" in r.getMessage()]
    assert failed and failed[0].levelno == logging.ERROR
    assert "ValueError: negative" in failed[0].getMessage()
    caplog.clear()
    timing.update(1.0)  # unregistered: no longer logs measurements
    assert not [r for r in caplog.records if r.name == "test.reporter"]


def test_observe_wraps_a_plain_function():
    timing = TimingMeter()
    metrics = MetricsMeter()

    @observe(timing, metrics)
    def simple_function(x):
        return x + 1

    assert simple_function(1) == 2
    assert simple_function.__name__ == "simple_function"
    assert timing.count == 1 and metrics.stats["successes"] == 1
    with pytest.raises(TypeError):
        observe()
    with pytest.raises(TypeError):
        observe(TimingMeter)


def test_observable_subclass_that_skips_init_still_works():
    class Lazy(Observable):
        EVENTS = ("ping",)

        def __init__(self):  # does not call Observable.__init__
            self.name = "lazy"

    lazy = Lazy()
    lazy.fire("ping")  # no subscribers yet: nothing happens
    seen = []
    lazy.on("ping", seen.append)
    lazy.fire("ping", 1)
    assert seen == [1] and Lazy().event("ping").subscribers == ()


def test_a_bad_value_leaves_the_meter_unchanged():
    meter = Meter()
    meter.update(2)
    with pytest.raises(TypeError):
        meter.update("three")
    with pytest.raises(TypeError):
        meter.update(None)
    assert (meter.count, meter.sum, meter.last, meter.value) == (1, 2, 2, 2.0)


def test_an_extractor_returning_garbage_is_a_hook_error_not_a_failed_call(caplog):
    sizes = MetricsMeter("size", extract=lambda result: "not a number")

    @task(on_execute=[sizes])
    def f():
        return 1

    with caplog.at_level(logging.ERROR, logger="eventforge"):
        assert f() == 1
    assert f.stats["hook_errors"] == 1 and sizes.successes == 1 and sizes.count == 0


def test_collected_weak_reporters_are_pruned():
    import gc

    class Quiet(Reporter):
        @observe(Door, "closed")
        def got(self, who):
            pass

    for _ in range(5):
        Quiet(weak=True)
    gc.collect()
    keeper = Quiet(weak=True)
    try:
        entries = ef._class_subscriptions[Door]["closed"]
        assert len(entries) == 1
    finally:
        keeper.unregister()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=12), min_size=1, max_size=4),
       st.lists(st.one_of(st.just("route"), st.integers(min_value=0, max_value=3)),
                max_size=25))
def test_least_loaded_matches_a_model(cpus, operations):
    # Property: select() reserves a slot on a least-loaded node that has room,
    # never goes over capacity, and raises "saturated" exactly when all are full.
    nodes = [Node(f"n{i}", cpus=c) for i, c in enumerate(cpus)]
    dispatcher = LeastLoadedDispatcher(nodes)
    for op in operations:
        if op == "route":
            if all(n.active >= n.capacity for n in nodes):
                with pytest.raises(RuntimeError, match="saturated"):
                    dispatcher.select()
            else:
                lowest = min(n.load() for n in nodes if n.active < n.capacity)
                before = {n.name: n.load() for n in nodes}
                chosen = dispatcher.select()
                assert before[chosen.name] == lowest
        else:
            nodes[op % len(nodes)].release()
        assert all(0 <= n.active <= n.capacity for n in nodes)


def test_least_loaded_under_contention_never_exceeds_capacity():
    over = []
    nodes = []

    def handler():
        for node in nodes:
            if node.active > node.capacity:
                over.append(node.name)
        time.sleep(0.001)

    nodes.extend(Node(f"n{i}", cpus=4 * (i + 1), handler=handler) for i in range(3))
    dispatcher = LeastLoadedDispatcher(nodes)
    routed, saturated = [], []

    def caller():
        for _ in range(50):
            try:
                dispatcher.route()
                routed.append(1)
            except RuntimeError:
                saturated.append(1)

    _in_threads(caller, 8)
    assert not over
    assert len(routed) + len(saturated) == 400 and routed
    assert all(node.active == 0 for node in nodes)


def test_async_functions_and_foreign_executors_are_refused():
    async def coro():
        pass

    with pytest.raises(TypeError, match="coroutine function"):
        task(coro)
    with pytest.raises(ValueError, match="unknown execution mode"):
        with cf.ThreadPoolExecutor(1) as pool:
            task(executor=pool)(lambda: None)
