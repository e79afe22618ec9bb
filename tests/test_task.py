"""@task, TaskRunner and TaskPool (section 10 of eventforge.py)."""

from __future__ import annotations

import inspect
import logging
import pickle
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import eventforge as ef
from eventforge import (
    ExecutionMode,
    Executor,
    MessageQueue,
    MetricsMeter,
    RPCClient,
    RPCServer,
    SharedState,
    TaskPool,
    TaskRunner,
    TimingMeter,
    task,
)


@pytest.fixture(autouse=True)
def _leaks(no_leaks):
    yield


# Module-level tasks: PROCESS mode pickles them by name.
@task(executor=ExecutionMode.PROCESS)
def cube(x):
    return x ** 3


@task
def plain_module_task(x):
    return x - 1


def _fail_in_child(message):
    raise ValueError(message)


@task()
def unpicklable_failure():
    class Local(Exception):
        pass
    raise Local("cannot cross a process boundary")


class Recorder:
    """An observer recording which hooks ran, in order, into a shared log."""

    def __init__(self, log, name="obs"):
        self.log = log
        self.name = name

    def on_start(self, ctx):
        self.log.append(f"{self.name}.start")

    def on_success(self, ctx):
        self.log.append(f"{self.name}.success")

    def on_failure(self, ctx):
        self.log.append(f"{self.name}.failure")

    def on_complete(self, ctx):
        self.log.append(f"{self.name}.complete")


def _user_callbacks(log):
    return dict(on_start=lambda ctx: log.append("user.start"),
                on_success=lambda ctx: log.append("user.success"),
                on_failure=lambda ctx: log.append("user.failure"),
                on_complete=lambda ctx: log.append("user.complete"))


# -- the decorator ---------------------------------------------------------------------


def test_signature_is_the_documented_one():
    params = inspect.signature(task).parameters
    assert list(params) == ["queue", "topic", "executor", "on_execute", "on_start",
                            "on_success", "on_failure", "on_complete", "publish_result",
                            "max_instances", "instance_timeout"]
    assert params["publish_result"].default is True
    assert all(p.default is None for name, p in params.items() if name != "publish_result")


def test_bare_and_called_forms():
    @task
    def a(x):
        return x + 1

    @task()
    def b(x):
        """Doc of b."""
        return x + 2

    assert isinstance(a, TaskRunner) and isinstance(b, TaskRunner)
    assert a(1) == 2 and b(1) == 3
    assert b.__name__ == "b" and b.__doc__ == "Doc of b." and b.__wrapped__ is not None
    assert plain_module_task(5) == 4
    assert isinstance(a.state, SharedState)
    # Uncapped, the pool only counts.
    assert a.pool.stats == {"active": 0, "queued": 0, "available": None, "max": None,
                            "total_processed": 1}


def test_lifecycle_order_observers_before_callbacks():
    log = []

    @task(on_execute=[Recorder(log, "o1"), Recorder(log, "o2")], **_user_callbacks(log))
    def work(x):
        log.append("body")
        return x

    assert work(7) == 7
    assert log == ["o1.start", "o2.start", "user.start", "body", "o1.success", "o2.success",
                   "user.success", "o1.complete", "o2.complete", "user.complete"]


def test_failure_reraised_and_hooks_fire():
    log = []
    contexts = []

    @task(on_execute=[Recorder(log)], on_failure=contexts.append, on_complete=contexts.append)
    def broken():
        log.append("body")
        raise KeyError("missing")

    with pytest.raises(KeyError, match="missing"):
        broken()
    assert log == ["obs.start", "body", "obs.failure", "obs.complete"]
    ctx = contexts[0]
    assert contexts == [ctx, ctx]
    assert isinstance(ctx.error, KeyError) and ctx.error_type == "KeyError"
    assert ctx.result is None and ctx.execution_time >= 0.0


def test_complete_fires_when_a_start_hook_raises():
    log = []

    def refuse(ctx):
        raise PermissionError("not now")

    @task(on_execute=[Recorder(log)], on_start=refuse, **{
        k: v for k, v in _user_callbacks(log).items() if k != "on_start"})
    def guarded():
        log.append("body")

    with pytest.raises(PermissionError, match="not now"):
        guarded()
    assert log == ["obs.start", "obs.failure", "user.failure", "obs.complete", "user.complete"]


def test_base_exception_in_body_still_completes():
    class Stop(BaseException):
        pass

    log = []

    @task(on_execute=[Recorder(log)])
    def halt():
        raise Stop()

    with pytest.raises(Stop):
        halt()
    assert log == ["obs.start", "obs.failure", "obs.complete"]


def test_errors_of_later_hooks_are_reported_not_raised(caplog):
    def bad_hook(ctx):
        raise RuntimeError("hook broke")

    @task(on_success=bad_hook, on_complete=[bad_hook, lambda ctx: None])
    def fine():
        return "ok"

    with caplog.at_level(logging.ERROR, logger="eventforge"):
        assert fine() == "ok"
    messages = [r.getMessage() for r in caplog.records]
    assert sum("hook broke" in m for m in messages) == 2
    assert any("on_success hook" in m for m in messages)
    assert fine.stats["hook_errors"] == 2


def test_context_fields():
    seen = []

    @task(on_complete=seen.append)
    def add(a, b=0):
        return a + b

    add(1, b=2)
    ctx = seen[0]
    assert ctx.task_name == "add" and ctx.args == (1,) and ctx.kwargs == {"b": 2}
    assert ctx.result == 3 and ctx.error is None and ctx.trigger == "call"
    assert ctx.end_time >= ctx.start_time and ctx.execution_time >= 0
    assert ctx.state is add.state and ctx.task_id
    add(1)
    assert seen[1].task_id != ctx.task_id


def test_state_is_shared_across_calls():
    @task()
    def count_calls():
        return count_calls.state.update("n", lambda n: n + 1, 0)

    assert [count_calls() for _ in range(3)] == [1, 2, 3]
    assert count_calls.state.get("n") == 3


def test_task_on_a_method():
    class Greeter:
        def __init__(self, name):
            self.name = name

        @task()
        def greet(self, other):
            return f"{self.name} greets {other}"

    assert Greeter("a").greet("b") == "a greets b"


def test_add_and_remove_observers():
    metrics = MetricsMeter()

    @task
    def f():
        return 1

    f()
    f.add_observer(metrics)
    f()
    assert f.observers == (metrics,)
    assert f.remove_observer(metrics) and not f.remove_observer(metrics)
    f()
    assert metrics.stats["calls"] == 1


# -- queue wiring -----------------------------------------------------------------------


def test_queue_trigger_payload_shapes_and_published_results():
    with MessageQueue() as queue:
        got = []

        @task(queue=queue, topic="jobs.add")
        def add(a=0, b=0, *rest):
            got.append((a, b, rest))
            return a + b + sum(rest)

        results = []
        queue.subscribe("jobs.add.success", lambda m: results.append(m.payload))
        queue.publish("jobs.add", {"a": 1, "b": 2})
        queue.publish("jobs.add", [3, 4, 5])
        queue.publish("jobs.add", 10)
        assert got == [(1, 2, ()), (3, 4, (5,)), (10, 0, ())]
        assert [r["result"] for r in results] == [3, 12, 10]
        assert all(set(r) == {"task_id", "result", "execution_time"} for r in results)
        assert all(r["execution_time"] >= 0 for r in results)
        assert add(1, 1) == 2  # a direct call publishes too
        assert [r["result"] for r in results] == [3, 12, 10, 2]
        add.close()
        queue.publish("jobs.add", [1, 1])
        assert len(got) == 4  # unsubscribed


def test_failure_published_and_reported_through_the_queue():
    errors = []
    with MessageQueue(on_error=lambda exc, msg: errors.append((type(exc), msg.topic))) as queue:
        @task(queue=queue, topic="risky")
        def risky(x):
            raise ValueError(f"bad {x}")

        failures = []
        queue.subscribe("risky.failure", lambda m: failures.append(m.payload))
        queue.publish("risky", 1)
        assert failures[0]["error"] == "bad 1" and failures[0]["error_type"] == "ValueError"
        assert set(failures[0]) == {"task_id", "error", "error_type", "execution_time"}
        # Nobody handles it in the task: the queue's error path sees it.
        assert errors == [(ValueError, "risky")]
        with pytest.raises(ValueError):
            risky(2)
        assert len(failures) == 2
        risky.close()


def test_on_failure_callback_handles_queue_triggered_failures():
    handled = []
    with MessageQueue() as queue:
        @task(queue=queue, topic="handled", on_failure=lambda ctx: handled.append(ctx.trigger))
        def boom():
            raise RuntimeError("x")

        queue.publish("handled", [])
        assert handled == ["queue"] and queue.stats["handler_errors"] == 0
        boom.close()


def test_publish_result_false_publishes_nothing():
    with MessageQueue() as queue:
        @task(queue=queue, topic="quiet", publish_result=False)
        def quiet():
            return 1

        seen = []
        queue.subscribe("quiet.*", seen.append)
        quiet()
        queue.publish("quiet", None)
        assert seen == []
        quiet.close()


def test_a_failed_publish_is_logged_not_swallowed(caplog):
    queue = MessageQueue()

    @task(queue=queue, topic="lost")
    def lost():
        return 1

    queue.close()
    with caplog.at_level(logging.ERROR, logger="eventforge"):
        assert lost() == 1
    assert lost.stats["publish_errors"] == 1
    assert any("could not publish its result to 'lost.success'" in r.getMessage()
               for r in caplog.records)


# -- executors -------------------------------------------------------------------------------


def test_thread_executor_runs_on_a_pool_thread_and_reports_failures():
    log = []
    threads = []
    with Executor(mode=ExecutionMode.THREAD, max_workers=2) as executor:
        @task(executor=executor, on_execute=[Recorder(log)],
              on_start=lambda ctx: threads.append(threading.current_thread().name))
        def maybe(fail):
            threads.append(threading.current_thread().name)
            if fail:
                raise ValueError("thread failure")
            return "fine"

        assert maybe(False) == "fine"
        with pytest.raises(ValueError, match="thread failure"):
            maybe(True)
        assert executor.stats["uncollected"] == 0
    assert log == ["obs.start", "obs.success", "obs.complete",
                   "obs.start", "obs.failure", "obs.complete"]
    assert all(name.startswith("eventforge-executor") for name in threads)


def test_sequential_executor_object():
    with Executor() as executor:
        @task(executor=executor)
        def one():
            return 1

        assert one() == 1


def test_process_executor_module_level_task():
    try:
        assert cube(3) == 27
        assert [cube(i) for i in range(4)] == [0, 1, 8, 27]
    finally:
        cube.close()


def test_task_runner_with_process_mode_returns_result():
    runner = TaskRunner(str.upper, executor=ExecutionMode.PROCESS)
    try:
        assert runner("hello") == "HELLO"
    finally:
        runner.close()


def test_process_failures_are_failures():
    log = []
    with Executor(mode=ExecutionMode.PROCESS, max_workers=1) as executor:
        runner = TaskRunner(_fail_in_child, executor=executor, on_execute=[Recorder(log)])
        with pytest.raises(ValueError, match="from the child"):
            runner("from the child")
        assert log == ["obs.start", "obs.failure", "obs.complete"]

        seen = []
        local = TaskRunner(lambda: 1, executor=executor, on_failure=seen.append)
        with pytest.raises(ef.RemoteError, match="PicklingError"):
            local()  # a lambda cannot reach a worker process: a failure, not a hang
        assert seen[0].error_type == "PicklingError"


def test_process_failure_with_an_exception_that_does_not_pickle():
    with Executor(mode=ExecutionMode.PROCESS, max_workers=1) as executor:
        runner = TaskRunner(unpicklable_failure.func, executor=executor)
        with pytest.raises(ef.RemoteError) as info:
            runner()
    assert "cannot cross a process boundary" in str(info.value)


def test_module_level_task_pickles_by_name():
    assert pickle.loads(pickle.dumps(plain_module_task)) is plain_module_task

    @task
    def local():
        pass

    with pytest.raises(TypeError, match="not defined at module level"):
        pickle.dumps(local)


# -- RPC -------------------------------------------------------------------------------------


def test_task_served_over_rpc_runs_observers_on_the_server():
    timing = TimingMeter()
    metrics = MetricsMeter()

    @task(on_execute=[timing, metrics])
    def predict(x):
        if x < 0:
            raise ValueError("negative input")
        return x * 2

    with MessageQueue() as queue:
        server = RPCServer(queue, service_name="ml")
        server.add_method("predict", predict)
        with server:
            client = RPCClient(queue, service_name="ml")
            assert client.call("predict", 2) == 4
            with pytest.raises(ef.RemoteError, match="ValueError: negative input"):
                client.call("predict", -1)
    assert timing.count == 2
    assert metrics.stats == {"calls": 2, "successes": 1, "failures": 1}


def test_task_served_over_tcp(tcp):
    metrics = MetricsMeter()

    @task(on_execute=[metrics])
    def predict(x):
        return x * 2

    server_transport = tcp.server()
    server_queue = MessageQueue(transport=server_transport)
    with RPCServer(server_queue, service_name="ml") as server:
        server.add_method("predict", predict)
        client = RPCClient(MessageQueue(transport=tcp.client(server_transport.port)),
                           service_name="ml", timeout=10)
        assert client.call("predict", 21) == 42
    assert metrics.stats["successes"] == 1


# -- TaskPool --------------------------------------------------------------------------------


def test_pool_caps_concurrency_and_times_out():
    inside = threading.Event()
    release = threading.Event()

    failures = []

    @task(max_instances=1, instance_timeout=0.2,
          on_failure=lambda ctx: failures.append(ctx.error_type))
    def exclusive():
        inside.set()
        release.wait(5)
        return "done"

    assert isinstance(exclusive.pool, TaskPool)
    results = []
    worker = threading.Thread(target=lambda: results.append(exclusive()))
    worker.start()
    try:
        assert inside.wait(5)
        stats = exclusive.pool.stats
        assert stats == {"active": 1, "queued": 0, "available": 0, "max": 1,
                         "total_processed": 0}
        with pytest.raises(TimeoutError, match="no free task slot"):
            exclusive()
    finally:
        release.set()
        worker.join()
    assert results == ["done"]
    assert exclusive.pool.stats["total_processed"] == 1  # the timed-out call held no slot
    assert failures == ["EventforgeTimeoutError"]  # and it was a failure like any other


def test_pool_queued_count_and_slot_context_manager():
    pool = TaskPool(2)
    with pool.slot():
        with pool.slot():
            assert pool.stats["available"] == 0
            waiter_in = threading.Event()

            def waiter():
                waiter_in.set()
                with pool.slot(timeout=5):
                    pass

            t = threading.Thread(target=waiter)
            t.start()
            assert waiter_in.wait(5)
            deadline = time.monotonic() + 5
            while pool.stats["queued"] != 1 and time.monotonic() < deadline:
                time.sleep(0.005)
            assert pool.stats["queued"] == 1
    t.join()
    assert pool.stats == {"active": 0, "queued": 0, "available": 2, "max": 2,
                          "total_processed": 3}


def test_pool_over_release_and_bad_arguments():
    pool = TaskPool(1)
    pool.acquire()
    pool.release()
    with pytest.raises(RuntimeError, match="more times than acquire"):
        pool.release()
    with pytest.raises(TimeoutError):
        with pool.slot():
            pool.acquire(timeout=0.01)
    with pytest.raises(ValueError):
        TaskPool(0)


# -- types and aliases ---------------------------------------------------------------------------


def test_request_and_response_records():
    req = ef.TaskRequest("f")
    assert (req.func_name, req.args, req.kwargs) == ("f", (), {})
    rpc = ef.RPCRequest("add", [1, 2], {"c": 3})
    assert rpc.method == "add" and rpc.args == (1, 2) and rpc.kwargs == {"c": 3} and rpc.id
    assert ef.RPCRequest("x").id != ef.RPCRequest("x").id
    resp = ef.RPCResponse("r1", rpc.id, result=3)
    assert (resp.result, resp.error, resp.error_type, resp.is_error) == (3, None, None, False)
    assert ef.RPCResponse("r2", "q", error="boom", error_type="ValueError").is_error
    again = ef.RPCRequest.model_validate_json(rpc.model_dump_json())
    assert again == rpc and again.model_dump()["args"] == (1, 2)
    assert "RPCRequest(method='add'" in repr(rpc)
    with pytest.raises(ValueError):
        ef.TaskRequest.model_validate({"func_name": "f", "extra": 1})
    assert issubclass(ef.QueueFullError, ef.EventforgeError)


def test_original_module_paths():
    from eventforge.observers import Meter, TimingMeter
    from eventforge.task import TaskRunner as AliasRunner
    from eventforge.task import task as alias_task
    from eventforge.types import RPCRequest, RPCResponse, TaskRequest

    assert Meter is ef.Meter and TimingMeter is ef.TimingMeter and AliasRunner is TaskRunner
    assert inspect.isfunction(alias_task) and alias_task.__name__ == "task"
    assert (TaskRequest, RPCRequest, RPCResponse) == (ef.TaskRequest, ef.RPCRequest,
                                                      ef.RPCResponse)
    import eventforge.task

    # Importing the alias rebinds eventforge.task; it still works as the decorator.
    @eventforge.task(on_execute=[MetricsMeter()])
    def f():
        return 5

    @eventforge.task
    def g():
        return 6

    assert f() == 5 and g() == 6
    assert list(inspect.signature(eventforge.task).parameters)[:2] == ["queue", "topic"]


def test_unhandled_errors_are_visible_without_logging_config():
    # No logging configured: hook errors and unhandled queue-triggered failures
    # reach stderr through the core's error path.
    import subprocess
    import sys
    import textwrap

    from _worker_helpers import child_env

    code = textwrap.dedent(
        """
        from eventforge import MessageQueue, task

        def bad_hook(ctx):
            raise RuntimeError("hook exploded")

        @task(on_success=bad_hook)
        def fine():
            return 1

        print(fine())
        queue = MessageQueue()

        @task(queue=queue, topic="jobs")
        def failing(x):
            raise ValueError("job exploded")

        queue.publish("jobs", 1)
        print("still running")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, env=child_env())
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["1", "still running"]
    assert "on_success hook" in result.stderr and "hook exploded" in result.stderr
    assert "ValueError: job exploded" in result.stderr


def test_thread_task_called_from_a_pooled_task_does_not_deadlock():
    with Executor(mode=ExecutionMode.THREAD, max_workers=1) as executor:
        @task(executor=executor)
        def inner(x):
            return x + 1

        @task(executor=executor)
        def outer(x):
            return inner(x) * 2  # the only pool thread is busy running outer

        assert outer(1) == 4


def test_any_callable_name_without_a_queue():
    runner = TaskRunner(lambda: "anonymous")
    assert runner() == "anonymous" and runner.topic == "<lambda>"
    with MessageQueue() as queue, pytest.raises(ef.TopicError):
        TaskRunner(lambda: None, queue=queue, topic="bad topic")


def _crash_worker():
    import os

    os._exit(3)


def test_a_crashed_worker_process_is_a_failure_not_a_hang():
    seen = []
    with Executor(mode=ExecutionMode.PROCESS, max_workers=1) as executor:
        runner = TaskRunner(_crash_worker, executor=executor, on_failure=seen.append)
        with pytest.raises(RuntimeError, match="terminated abruptly") as info:
            runner()
        assert seen[0].error is info.value and seen[0].error_type == "BrokenProcessPool"
        assert TaskRunner(str.lower, executor=executor)("OK") == "ok"  # the pool recovers


def test_meters_survive_a_start_hook_that_failed_before_them():
    import tracemalloc

    from eventforge import CPUMeter, MemoryMeter

    memory, cpu = MemoryMeter(), CPUMeter()

    class Refuse:
        def on_start(self, ctx):
            raise RuntimeError("refused")

    @task(on_execute=[Refuse(), memory, cpu])
    def never():
        raise AssertionError("the body must not run")

    with pytest.raises(RuntimeError, match="refused"):
        never()
    assert memory.count == 0 and cpu.count == 0
    assert not tracemalloc.is_tracing()


def test_module_level_task_on_a_process_rpc_server():
    with MessageQueue() as queue, Executor(mode=ExecutionMode.PROCESS, max_workers=1) as ex:
        server = RPCServer(queue, executor=ex, service_name="calc")
        server.add_method("dec", plain_module_task)
        with server:
            assert RPCClient(queue, service_name="calc", timeout=30).call("dec", 10) == 9


# -- property tests ---------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(st.one_of(st.none(), st.integers(min_value=1, max_value=4)),
       st.lists(st.sampled_from(["acquire", "release"]), max_size=30))
def test_pool_matches_a_counting_model(limit, operations):
    pool = TaskPool(limit, timeout=0)
    held = processed = 0
    for op in operations:
        if op == "acquire":
            if limit is not None and held >= limit:
                with pytest.raises(TimeoutError):
                    pool.acquire()
            else:
                pool.acquire()
                held += 1
        elif held == 0:
            with pytest.raises(RuntimeError):
                pool.release()
        else:
            pool.release()
            held -= 1
            processed += 1
        assert pool.stats == {
            "active": held, "queued": 0, "max": limit,
            "available": None if limit is None else limit - held,
            "total_processed": processed,
        }


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["set", "delete", "bump", "clear"]),
                          st.sampled_from("abc"), st.integers()), max_size=30))
def test_shared_state_matches_a_dict(operations):
    state, model = SharedState(), {}
    for op, key, value in operations:
        if op == "set":
            state.set(key, value)
            model[key] = value
        elif op == "delete":
            assert state.delete(key) is (key in model)
            model.pop(key, None)
        elif op == "bump":
            assert state.update(key, lambda v: v + 1, 0) == model.get(key, 0) + 1
            model[key] = model.get(key, 0) + 1
        else:
            state.clear()
            model.clear()
        assert dict(state.items()) == model
        assert all(state.contains(k) == (k in model) for k in "abc")


def test_a_result_the_wire_cannot_carry_is_reported_over_tcp(tcp, caplog):
    server = tcp.server()
    queue = MessageQueue(transport=tcp.client(server.port))

    @task(queue=queue, topic="made")
    def make():
        return object()  # not JSON: the published result cannot be encoded

    with caplog.at_level(logging.ERROR, logger="eventforge"):
        assert type(make()) is object  # the caller still gets its result
    assert make.stats["publish_errors"] == 1
    assert any("could not publish its result to 'made.success'" in r.getMessage()
               for r in caplog.records)
    make.close()


def test_an_object_with_no_hook_is_refused_as_an_observer():
    def double(x):
        return x * 2

    for not_an_observer in (3, "timing", object()):
        with pytest.raises(TypeError, match="is not an observer: it has none of on_start"):
            ef.task(on_execute=[not_an_observer])(double)
        with pytest.raises(TypeError, match="is not an observer"):
            ef.observe(not_an_observer)(double)
    runner = ef.task(on_execute=[ef.TimingMeter()])(double)
    with pytest.raises(TypeError, match="is not an observer"):
        runner.add_observer(42)
    assert runner(21) == 42 and len(runner.observers) == 1   # left as it was

    class OnlyComplete:   # one hook is enough
        def __init__(self):
            self.seen = []

        def on_complete(self, ctx):
            self.seen.append(ctx.result)

    watcher = OnlyComplete()
    assert ef.task(on_execute=watcher)(double)(4) == 8 and watcher.seen == [8]
