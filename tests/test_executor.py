"""Executor, ExecutionMode, TaskStatus and TaskResult (section 7 of eventforge.py)."""

from __future__ import annotations

import asyncio
import os
import pickle
import threading
import time

import pytest
from _worker_helpers import assert_no_leaks, leak_snapshot

import eventforge as ef
from eventforge import ExecutionMode, Executor, TaskResult, TaskStatus

SLACK = 2.0  # generous: the machine is shared, timing is never asserted tightly


@pytest.fixture(autouse=True)
def no_leaks():
    before = leak_snapshot()
    yield
    assert_no_leaks(before)


# Module-level helpers so PROCESS mode can pickle them by reference.
def square(x):
    return x * x


def fail(message):
    raise ValueError(message)


def returns_unpicklable():
    return threading.Lock()


def hard_exit():
    os._exit(3)


def pid():
    return os.getpid()


def echo_kwargs(*args, **kwargs):
    return [list(args), kwargs]


class TestEnums:
    def test_modes(self):
        assert [m.value for m in ExecutionMode] == ["sequential", "thread", "process"]
        assert ExecutionMode("thread") is ExecutionMode.THREAD
        assert Executor("process").mode is ExecutionMode.PROCESS

    def test_statuses(self):
        assert [s.value for s in TaskStatus] == [
            "pending", "running", "completed", "failed", "cancelled"]
        assert TaskStatus.COMPLETED == "completed"


class TestValidation:
    def test_bad_mode(self):
        with pytest.raises(ValueError, match="unknown execution mode 'fibers'"):
            Executor("fibers")

    @pytest.mark.parametrize("n", [0, -1, 1.5, True, "4"])
    def test_bad_max_workers(self, n):
        with pytest.raises(ValueError, match="max_workers"):
            Executor(ExecutionMode.THREAD, max_workers=n)

    def test_bad_max_results(self):
        with pytest.raises(ValueError, match="max_results"):
            Executor(max_results=0)

    def test_not_callable(self):
        with pytest.raises(TypeError, match="callable"):
            Executor().submit(42)

    def test_bad_timeout(self):
        ex = Executor()
        tid = ex.submit(square, 2)
        with pytest.raises(ValueError, match="timeout"):
            ex.result(tid, timeout=-1)
        with pytest.raises(TypeError, match="timeout"):
            ex.result(tid, timeout="1")
        assert ex.result(tid).value == 4


class TestTaskResult:
    def test_success_and_failure_flags(self):
        ok = TaskResult("t1", TaskStatus.COMPLETED, value=3)
        bad = TaskResult("t2", TaskStatus.FAILED, error="boom", error_type="ValueError")
        cancelled = TaskResult("t3", "cancelled")
        assert ok.is_success and not ok.is_failure
        assert bad.is_failure and not bad.is_success
        assert cancelled.is_failure and cancelled.status is TaskStatus.CANCELLED
        assert ok.unwrap() == 3
        with pytest.raises(ef.RemoteError, match="ValueError: boom"):
            bad.unwrap()

    def test_pickles_and_dumps(self):
        r = TaskResult("t1", TaskStatus.FAILED, None, "boom", "ValueError", 0.5, "w",
                       "tb", ValueError("boom"))
        again = pickle.loads(pickle.dumps(r))
        assert again == r and isinstance(again.exception, ValueError)
        assert r.model_dump() == {
            "task_id": "t1", "status": "failed", "value": None, "error": "boom",
            "error_type": "ValueError", "execution_time": 0.5, "worker_id": "w",
        }
        # an exception that cannot pickle is dropped, the strings survive
        r.exception = ValueError(threading.Lock())
        assert pickle.loads(pickle.dumps(r)).exception is None


class TestSequential:
    def test_runs_inline_at_submit(self):
        seen = []
        ex = Executor()
        tid = ex.submit(seen.append, 1)
        assert seen == [1]
        res = ex.result(tid)
        assert res.is_success and res.value is None
        assert res.worker_id == threading.current_thread().name
        assert res.execution_time >= 0

    def test_failure_is_a_result(self):
        ex = Executor()
        res = ex.result(ex.submit(fail, "boom"))
        assert res.status is TaskStatus.FAILED
        assert (res.error, res.error_type) == ("boom", "ValueError")
        assert "ValueError: boom" in res.traceback
        assert isinstance(res.exception, ValueError)

    def test_user_timeout_and_priority_kwargs_reach_the_function(self):
        ex = Executor()
        res = ex.result(ex.submit(echo_kwargs, 1, timeout=5, priority="high"))
        assert res.value == [[1], {"timeout": 5, "priority": "high"}]

    def test_map_in_order(self):
        assert [r.value for r in Executor().map(square, range(5))] == [0, 1, 4, 9, 16]


class TestBookkeeping:
    def test_result_is_released_once_collected(self):
        ex = Executor()
        tid = ex.submit(square, 3)
        assert ex.result(tid).value == 9
        with pytest.raises(ef.TaskNotFoundError):
            ex.result(tid)
        assert ex.stats["uncollected"] == 0

    def test_unknown_id_raises_at_once_and_is_both_timeout_and_key_error(self):
        ex = Executor(ExecutionMode.THREAD)
        start = time.monotonic()
        with pytest.raises(TimeoutError) as info:
            ex.result("no-such-task")
        assert time.monotonic() - start < SLACK
        assert isinstance(info.value, KeyError)
        assert isinstance(info.value, ef.EventforgeTimeoutError)
        assert "unknown task id 'no-such-task'" in str(info.value)

    def test_cap_drops_oldest_uncollected(self, caplog):
        ex = Executor(max_results=10)
        ids = [ex.submit(square, i) for i in range(25)]
        assert ex.stats["uncollected"] == 10 and ex.stats["dropped"] == 15
        with pytest.raises(ef.TaskNotFoundError):
            ex.result(ids[0])
        assert ex.result(ids[-1]).value == 24 * 24
        assert "dropped the uncollected result" in caplog.text
        drops = [r for r in caplog.records if "dropped the uncollected" in r.getMessage()]
        assert len(drops) == 1  # one line for 15 drops, never one per task

    @pytest.mark.parametrize("mode", [ExecutionMode.SEQUENTIAL, ExecutionMode.THREAD])
    def test_many_tasks_leave_nothing_behind(self, mode):
        with Executor(mode, max_workers=2) as ex:
            for i in range(20_000):
                assert ex.result(ex.submit(square, i)).value == i * i
            assert ex.stats["uncollected"] == 0
            assert ex.stats["submitted"] == 20_000
            ex.map(square, range(5000))
            assert ex.stats["uncollected"] == 0


class TestThread:
    def test_submit_result(self):
        with Executor(ExecutionMode.THREAD, max_workers=2) as ex:
            res = ex.result(ex.submit(square, 7), timeout=10)
            assert res.value == 49 and res.worker_id.startswith("eventforge-executor")

    def test_runs_concurrently(self):
        barrier = threading.Barrier(3, timeout=10)
        with Executor(ExecutionMode.THREAD, max_workers=3) as ex:
            ids = [ex.submit(barrier.wait) for _ in range(3)]
            assert all(ex.result(t, timeout=10).is_success for t in ids)

    def test_timeout_then_still_collectable(self):
        gate = threading.Event()
        with Executor(ExecutionMode.THREAD, max_workers=1) as ex:
            tid = ex.submit(gate.wait, 10)
            assert ex.status(tid) in (TaskStatus.PENDING, TaskStatus.RUNNING)
            start = time.monotonic()
            with pytest.raises(ef.EventforgeTimeoutError):
                ex.result(tid, timeout=0.2)
            assert 0.2 <= time.monotonic() - start < 0.2 + SLACK
            gate.set()
            assert ex.result(tid, timeout=10).value is True

    def test_map_keeps_input_order(self):
        def sleepy(x):
            time.sleep(0.01 * (5 - x))
            return x

        with Executor(ExecutionMode.THREAD, max_workers=5) as ex:
            assert [r.value for r in ex.map(sleepy, range(5), timeout=10)] == [0, 1, 2, 3, 4]

    def test_map_timeout_cancels_the_rest(self):
        gate = threading.Event()
        with Executor(ExecutionMode.THREAD, max_workers=1) as ex:
            with pytest.raises(ef.EventforgeTimeoutError, match="map"):
                ex.map(lambda _: gate.wait(10), range(4), timeout=0.1)
            gate.set()
            assert ex.stats["uncollected"] == 0

    def test_stop_without_wait_cancels_queued_tasks(self):
        gate = threading.Event()
        ex = Executor(ExecutionMode.THREAD, max_workers=1)
        first = ex.submit(gate.wait, 10)
        queued = [ex.submit(square, i) for i in range(3)]
        ex.stop(wait=False)
        gate.set()
        assert ex.result(first, timeout=10).is_success
        for tid in queued:
            res = ex.result(tid, timeout=10)
            assert res.status is TaskStatus.CANCELLED and res.is_failure

    def test_restart_after_stop(self):
        ex = Executor(ExecutionMode.THREAD)
        ex.start()
        assert ex.running
        ex.stop()
        assert not ex.running
        assert ex.result(ex.submit(square, 2), timeout=10).value == 4  # starts a new pool
        ex.stop()

    def test_cancel(self):
        gate = threading.Event()
        with Executor(ExecutionMode.THREAD, max_workers=1) as ex:
            ex.submit(gate.wait, 10)
            tid = ex.submit(square, 3)
            assert ex.cancel(tid) is True
            gate.set()
            assert ex.result(tid).status is TaskStatus.CANCELLED


class TestProcess:
    def test_runs_in_other_processes(self):
        with Executor(ExecutionMode.PROCESS, max_workers=2) as ex:
            res = ex.result(ex.submit(pid), timeout=30)
            assert res.is_success and res.value != os.getpid()
            assert res.worker_id == f"pid:{res.value}"
            assert [r.value for r in ex.map(square, [3, 1, 2], timeout=30)] == [9, 1, 4]

    def test_failures_come_back_as_results(self):
        with Executor(ExecutionMode.PROCESS, max_workers=1) as ex:
            res = ex.result(ex.submit(fail, "boom"), timeout=30)
            assert (res.status, res.error_type) == (TaskStatus.FAILED, "ValueError")
            assert res.error == "boom"
            assert "in fail" in res.traceback

            res = ex.result(ex.submit(lambda: 1), timeout=30)  # cannot pickle the function
            assert res.status is TaskStatus.FAILED
            assert res.error_type == "PicklingError" and "pickle" in res.error.lower()

            res = ex.result(ex.submit(returns_unpicklable), timeout=30)
            assert res.status is TaskStatus.FAILED and "pickle" in res.error.lower()

    def test_broken_pool_is_a_failure_and_the_executor_recovers(self):
        with Executor(ExecutionMode.PROCESS, max_workers=1) as ex:
            res = ex.result(ex.submit(hard_exit), timeout=30)
            assert res.status is TaskStatus.FAILED and res.error_type == "BrokenProcessPool"
            assert ex.result(ex.submit(square, 5), timeout=30).value == 25
            assert ex.stats["pools_replaced"] == 1


class TestAsync:
    def test_submit_and_result_async(self):
        async def go():
            with Executor(ExecutionMode.THREAD) as ex:
                tid = await ex.submit_async(echo_kwargs, 1, timeout=3)
                return await ex.result_async(tid, timeout=10)

        assert asyncio.run(go()).value == [[1], {"timeout": 3}]

    def test_result_async_timeout_is_exact_and_keeps_the_task(self):
        gate = threading.Event()

        async def go():
            with Executor(ExecutionMode.THREAD, max_workers=1) as ex:
                tid = ex.submit(gate.wait, 10)
                start = time.monotonic()
                with pytest.raises(ef.EventforgeTimeoutError):
                    await ex.result_async(tid, timeout=0.2)
                elapsed = time.monotonic() - start
                gate.set()
                return elapsed, await ex.result_async(tid, timeout=10)

        elapsed, res = asyncio.run(go())
        assert 0.2 <= elapsed < 0.2 + SLACK and res.value is True

    def test_cancelled_waiter_leaves_the_task_collectable(self):
        gate = threading.Event()

        async def go():
            with Executor(ExecutionMode.THREAD, max_workers=1) as ex:
                tid = ex.submit(gate.wait, 10)
                waiter = asyncio.ensure_future(ex.result_async(tid))
                await asyncio.sleep(0.05)
                waiter.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await waiter
                gate.set()
                return await ex.result_async(tid, timeout=10)

        assert asyncio.run(go()).is_success

    def test_map_async(self):
        async def go():
            with Executor(ExecutionMode.THREAD, max_workers=2) as ex:
                return await ex.map_async(square, range(6), timeout=10)

        assert [r.value for r in asyncio.run(go())] == [0, 1, 4, 9, 16, 25]

    def test_map_async_timeout(self):
        gate = threading.Event()

        async def go():
            with Executor(ExecutionMode.THREAD, max_workers=1) as ex:
                with pytest.raises(ef.EventforgeTimeoutError):
                    await ex.map_async(lambda _: gate.wait(10), range(3), timeout=0.1)
                gate.set()

        asyncio.run(go())

    def test_sequential_async(self):
        async def go():
            ex = Executor()
            tid = await ex.submit_async(square, 4)
            return await ex.result_async(tid), await ex.map_async(square, [1, 2])

        res, many = asyncio.run(go())
        assert res.value == 16 and [r.value for r in many] == [1, 4]


class TestSubmitFuture:
    """``Executor.submit_future``: the public hook RPCServer, dispatchers and tasks use."""

    @pytest.mark.parametrize("mode", ["sequential", "thread"])
    def test_resolves_to_a_task_result_and_keeps_no_bookkeeping(self, mode):
        import concurrent.futures as cf

        with Executor(mode, max_workers=2) as ex:
            ok = ex.submit_future(echo_kwargs, [1, 2], {"k": 3})
            bad = ex.submit_future(fail, ("boom",))
            assert isinstance(ok, cf.Future) and isinstance(bad, cf.Future)
            res = ok.result(timeout=10)
            assert isinstance(res, TaskResult) and res.status is TaskStatus.COMPLETED
            assert res.value == [[1, 2], {"k": 3}] and res.task_id.startswith("task-")
            failed = bad.result(timeout=10)  # a failure of func is a result, not a raise
            assert (failed.status, failed.error_type, failed.error) == (
                TaskStatus.FAILED, "ValueError", "boom")
            assert ex.stats["submitted"] == 2 and ex.stats["uncollected"] == 0

    def test_sequential_runs_here_and_is_done_at_once(self):
        ex = Executor()
        future = ex.submit_future(threading.current_thread)
        assert future.done() and not future.running() and not future.cancelled()
        assert future.result(0).value is threading.current_thread()

    def test_thread_mode_runs_on_a_pool_thread(self):
        with Executor(ExecutionMode.THREAD, max_workers=1) as ex:
            res = ex.submit_future(threading.current_thread).result(timeout=10)
        assert res.value is not threading.current_thread()
        assert res.worker_id.startswith("eventforge-executor")

    def test_refuses_a_non_callable(self):
        with pytest.raises(TypeError, match="callable"):
            Executor().submit_future(42)

    def test_process_mode_pickling_failure_is_the_futures_exception(self):
        with Executor(ExecutionMode.PROCESS, max_workers=1) as ex:
            future = ex.submit_future(lambda: 1)  # cannot pickle the function
            with pytest.raises(Exception, match="(?i)pickle"):
                future.result(timeout=30)
            assert ex.submit_future(square, (6,)).result(timeout=30).value == 36


class TestDoneNowIsAFinishedFuture:
    """A SEQUENTIAL task comes back as an already-completed ``concurrent.futures.Future``
    that behaves as one built with ``set_result`` (``wait``, callbacks, cancel ...)."""

    def test_it_behaves_as_a_finished_future(self):
        import concurrent.futures as cf

        ex = Executor()
        future = ex.submit_future(square, (3,))
        plain = cf.Future()
        plain.set_result("later")
        assert future.done() and not future.cancel() and not future.cancelled()
        assert future.result().value == 9 and future.exception() is None
        assert future.exception(timeout=0) is None and future.result(timeout=0).value == 9
        seen = []
        future.add_done_callback(lambda f: seen.append((threading.current_thread(), f)))
        assert seen == [(threading.current_thread(), future)]  # at once, in this thread
        done, pending = cf.wait([future, plain, ex.submit_future(square, (2,))], timeout=1)
        assert len(done) == 3 and not pending
        assert {f.result() if f is plain else f.result().value
                for f in cf.as_completed([future, plain], timeout=1)} == {9, "later"}
        with pytest.raises(cf.InvalidStateError):
            future.set_result("again")
        assert future.result().value == 9

    def test_wait_mixes_done_now_with_done_later(self):
        import concurrent.futures as cf

        gate = threading.Event()
        with Executor(ExecutionMode.THREAD, max_workers=1) as ex:
            later = ex.submit_future(gate.wait, (10,))
            now = Executor().submit_future(square, (4,))
            done, pending = cf.wait([now, later], timeout=0.05,
                                    return_when=cf.FIRST_COMPLETED)
            assert done == {now} and pending == {later}
            gate.set()
            done, pending = cf.wait([now, later], timeout=10)
            assert done == {now, later} and later.result().value is True

    def test_status_and_cancel_of_a_sequential_task(self):
        ex = Executor()
        tid = ex.submit(square, 5)
        assert ex.status(tid) is TaskStatus.COMPLETED and ex.cancel(tid) is False
        assert ex.result(tid, timeout=0).value == 25

    @pytest.mark.parametrize("mode", ["sequential", "thread"])
    def test_map_of_a_non_callable_fails_each_item_rather_than_raising(self, mode):
        with Executor(mode, max_workers=1) as ex:
            results = ex.map(42, [1, 2])
        assert [(r.status, r.error_type) for r in results] == [(TaskStatus.FAILED, "TypeError")] * 2


class TestThreadPoolLifeCycle:
    """THREAD mode's workers behave as ``ThreadPoolExecutor``'s: started as tasks need
    them, gone with a dropped executor, and at interpreter exit they finish the
    queued tasks first and refuse new ones."""

    def test_threads_start_only_as_tasks_need_them(self):
        with Executor(ExecutionMode.THREAD, max_workers=8) as ex:
            assert ex.result(ex.submit(square, 2), timeout=10).is_success
            workers = {ex.result(ex.submit(threading.current_thread), timeout=10).value.name
                       for _ in range(20)}
            assert 1 <= len(workers) <= 8
            gate = threading.Event()
            ids = [ex.submit(gate.wait, 10) for _ in range(8)]  # 8 blocked: 8 threads
            assert all(ex.status(t) in (TaskStatus.PENDING, TaskStatus.RUNNING) for t in ids)
            gate.set()
            names = {ex.result(t, timeout=10).worker_id for t in ids}
            assert names <= {f"eventforge-executor_{i}" for i in range(8)}

    def test_a_dropped_executor_lets_its_workers_go(self):
        def use_and_drop():
            ex = Executor(ExecutionMode.THREAD, max_workers=3)
            assert [r.value for r in ex.map(square, range(6), timeout=10)] == [
                0, 1, 4, 9, 16, 25]
            return {t for t in threading.enumerate() if t.name.startswith("eventforge-exec")}

        workers = use_and_drop()  # never stopped: the no_leaks fixture checks they end
        assert workers
        deadline = time.monotonic() + 10
        while any(t.is_alive() for t in workers) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not any(t.is_alive() for t in workers)

    def test_cancel_twice_and_cancel_after_the_run(self):
        gate = threading.Event()
        with Executor(ExecutionMode.THREAD, max_workers=1) as ex:
            first = ex.submit(gate.wait, 10)
            queued = ex.submit(square, 3)
            assert ex.cancel(queued) is True and ex.cancel(queued) is True
            assert ex.status(queued) is TaskStatus.CANCELLED
            gate.set()
            assert ex.result(first, timeout=10).is_success
            assert ex.result(queued, timeout=0).status is TaskStatus.CANCELLED
            done = ex.submit(square, 4)
            assert ex.result(done, timeout=10).value == 16
            with pytest.raises(ef.TaskNotFoundError):
                ex.cancel(done)

    def test_interpreter_exit_runs_the_queued_tasks_then_refuses_new_ones(self, tmp_path):
        import subprocess
        import sys

        script = tmp_path / "exit.py"
        script.write_text(
            "import atexit, time\n"
            "import eventforge as ef\n"
            "def late():\n"
            "    try:\n"
            "        ex.submit(print, 'late task ran')\n"
            "        print('late submit accepted')\n"
            "    except RuntimeError:\n"
            "        print('late submit refused')\n"
            "atexit.register(late)  # runs after the executor's exit hook (LIFO)\n"
            "ex = ef.Executor(ef.ExecutionMode.THREAD, max_workers=1)  # one printer\n"
            "for i in range(3):\n"
            "    ex.submit(lambda i=i: (time.sleep(0.1), print('ran', i, flush=True)))\n"
            "print('main done', flush=True)\n"
        )
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, PYTHONPATH=root)
        out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                             timeout=60, env=env)
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert lines[0] == "main done"
        assert lines[1:4] == ["ran 0", "ran 1", "ran 2"]
        assert lines[4:] == ["late submit refused"]
