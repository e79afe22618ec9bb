"""pytest-benchmark suite of the Executor and RPC (run: pytest bench/ --benchmark-only).

Each group holds eventforge and its baseline, so the table compares them
directly.  ``bench/bench_executor.py`` and ``bench/bench_rpc.py`` print the
ratios with the issue targets (and the TCP peers).
"""

from __future__ import annotations

import concurrent.futures as cf

import pytest

import eventforge as ef


def work(x):
    return x


@pytest.mark.benchmark(group="thread submit+result")
def test_threadpoolexecutor(benchmark):
    with cf.ThreadPoolExecutor(4) as pool:
        benchmark(lambda: pool.submit(work, 1).result())


@pytest.mark.benchmark(group="thread submit+result")
def test_executor_thread(benchmark):
    with ef.Executor(ef.ExecutionMode.THREAD, max_workers=4) as ex:
        benchmark(lambda: ex.result(ex.submit(work, 1)))


@pytest.mark.benchmark(group="sequential submit+result")
def test_executor_sequential(benchmark):
    ex = ef.Executor()
    benchmark(lambda: ex.result(ex.submit(work, 1)))


@pytest.fixture
def queue():
    q = ef.MessageQueue()
    yield q
    q.close()


@pytest.mark.benchmark(group="local request-reply")
def test_queue_request(benchmark, queue):
    queue.subscribe("math.add", lambda m: queue.reply(m, m.payload[0] + m.payload[1]))
    benchmark(lambda: queue.request("math.add", [1, 2], timeout=5))


@pytest.mark.benchmark(group="local request-reply")
def test_rpc_call_memory(benchmark, queue):
    server = ef.RPCServer(queue, service_name="bench")
    server.add_method("add", lambda a, b: a + b)
    server.serve(blocking=False)
    client = ef.RPCClient(queue, service_name="bench")
    benchmark(lambda: client.call("add", 1, 2))
    server.stop()
