"""The public API of eventforge 0.1, as its reference README names it, holds here.

Two halves:

* every class, method, property and parameter the reference names exists under
  that name and accepts the call shapes written there (checked with
  ``inspect.signature``), and behaves as the reference says (return types,
  defaults, dynamic access, context managers, async variants);
* every code sample of the reference runs *verbatim* in a fresh interpreter
  (the code is copied as data into ``tests/_reference_samples.py``, since the
  reference text is not part of the repository) and prints what its comments
  promise.

Samples that bind the fixed ports of the reference (9090, 9001) run as written
when the port is free and are skipped, with the reason, when something else
holds it. The Redis sample gets a real redis-server on 127.0.0.1:6379 (started
here and stopped after, unless one already listens there).
"""

from __future__ import annotations

import asyncio
import errno
import inspect
import os
import re
import socket
import subprocess
import sys
import textwrap

import pytest
from _reference_samples import (
    SAMPLE_EXECUTOR,
    SAMPLE_MESSAGE_QUEUE,
    SAMPLE_OBSERVERS,
    SAMPLE_REMOTE_QUEUE,
    SAMPLE_RPC,
    SAMPLE_TASK,
    SAMPLE_TASK_REFERENCE,
    SAMPLE_TASK_RPC,
    SAMPLE_TRANSPORTS,
)
from _servers import RedisServer, find_binary
from _worker_helpers import REPO, Worker, child_env

import eventforge as ef

pytestmark = pytest.mark.usefixtures("no_leaks")


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def _params(obj):
    return inspect.signature(obj).parameters


def _default(obj, name):
    return _params(obj)[name].default


def _binds(obj, *args, **kwargs):
    """True when the call shape binds (raises TypeError with the signature otherwise)."""
    signature = inspect.signature(obj)
    try:
        signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise AssertionError(
            f"{obj.__qualname__}{signature} rejects {args!r} {kwargs!r}: {exc}") from None
    return True


def _port_holder(port, host="0.0.0.0"):
    """None when *port* can be bound like the samples do, else a reason to skip."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        probe.bind((host, port))
    except OSError as exc:
        return f"port {port} is taken by another program ({exc.strerror}); sample binds it as-is"
    finally:
        probe.close()
    return None


def _listening(port, host="127.0.0.1"):
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def _run_sample(tmp_path, code, *, name="sample.py", show=(), timeout=60):
    """Run *code* verbatim as ``python name`` (cwd *tmp_path*, PYTHONPATH at the repo).

    ``show`` names globals whose repr is printed after the script finished (the
    script itself runs unchanged through ``runpy`` as ``__main__``).
    """
    script = tmp_path / name
    script.write_text(code)
    if show:
        runner = textwrap.dedent(
            f"""
            import runpy, sys
            sys.argv = [{str(script)!r}]
            found = runpy.run_path({str(script)!r}, run_name="__main__")
            for name in {list(show)!r}:
                print(f"@{{name}}={{found[name]!r}}")
            """
        )
        command = [sys.executable, "-c", runner]
    else:
        command = [sys.executable, str(script)]
    result = subprocess.run(command, cwd=str(tmp_path), env=child_env(), stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0 and (f"[Errno {errno.EADDRINUSE}]" in result.stderr
                                   or "Address already in use" in result.stderr):
        pytest.skip(f"a port of the sample was taken by another program meanwhile:\n"
                    f"{result.stderr[-400:]}")
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    return result.stdout.splitlines()


# ---------------------------------------------------------------------------
# 1. names, parameters and defaults
# ---------------------------------------------------------------------------


class TestTransportApi:
    def test_memory_transport(self):
        assert _default(ef.MemoryTransport, "max_queue_size") == 1000
        transport = ef.MemoryTransport(max_queue_size=1000)
        try:
            assert isinstance(transport, ef.Transport)
        finally:
            transport.close()

    def test_tcp_transports_and_their_import_path(self):
        from eventforge.transports.tcp import TCPClientTransport, TCPServerTransport

        assert TCPServerTransport is ef.TCPServerTransport
        assert TCPClientTransport is ef.TCPClientTransport
        assert _default(TCPServerTransport, "host") == "127.0.0.1"
        assert _default(TCPServerTransport, "port") == 9090
        assert _default(TCPClientTransport, "host") == "localhost"
        assert _default(TCPClientTransport, "port") == 9090
        _binds(TCPServerTransport, host="127.0.0.1", port=9090)
        _binds(TCPClientTransport, host="localhost", port=9090)
        _binds(TCPServerTransport, "127.0.0.1", 9090)  # TCPServerTransport(host, port)
        _binds(TCPClientTransport, "localhost", 9090)
        assert callable(TCPServerTransport.start) and callable(TCPClientTransport.connect)
        assert issubclass(TCPServerTransport, ef.Transport)
        assert issubclass(TCPClientTransport, ef.Transport)

    def test_start_and_connect_over_loopback(self):
        server = ef.TCPServerTransport(host="127.0.0.1", port=0).start()
        try:
            client = ef.TCPClientTransport(host="127.0.0.1", port=server.port).connect(timeout=10)
            try:
                sender = ef.MessageQueue(transport=client)
                receiver = ef.MessageQueue(transport=server)
                assert isinstance(sender.publish("t", 1), str)
                message = receiver.receive("t", timeout=10)
                assert message is not None and message.payload == 1
            finally:
                client.close()
        finally:
            server.close()

    def test_receive_async_on_every_core_transport(self):
        server = ef.TCPServerTransport(host="127.0.0.1", port=0).start()
        client = ef.TCPClientTransport(host="127.0.0.1", port=server.port).connect(timeout=10)
        memory = ef.MemoryTransport()
        try:
            for transport in (memory, server, client):
                assert asyncio.run(transport.receive_async("none", timeout=0.05)) is None
            ef.MessageQueue(memory).publish("m", 1)
            assert asyncio.run(memory.receive_async("m", timeout=10)).payload == 1
            ef.MessageQueue(client).publish("to.server", 2)
            assert asyncio.run(server.receive_async("to.server", timeout=10)).payload == 2
        finally:
            client.close()
            server.close()
            memory.close()

    def test_broker_transport_import_paths(self):
        from eventforge.transports.nats import NatsTransport
        from eventforge.transports.redis import RedisTransport

        for cls in (RedisTransport, NatsTransport):
            assert issubclass(cls, ef.Transport), cls
        _binds(RedisTransport, host="localhost", port=6379)

    def test_abc_has_exactly_the_six_methods(self):
        six = {"send", "receive", "receive_async", "subscribe", "unsubscribe", "close"}
        assert set(ef.Transport.__abstractmethods__) == six
        assert inspect.iscoroutinefunction(ef.Transport.receive_async)
        _binds(ef.Transport.send, None, "message")
        _binds(ef.Transport.receive, None, "topic", timeout=None)
        _binds(ef.Transport.receive_async, None, "topic", timeout=None)
        _binds(ef.Transport.subscribe, None, "topic", lambda message: None)
        _binds(ef.Transport.unsubscribe, None, "subscription-id")
        _binds(ef.Transport.close, None)
        assert _default(ef.Transport.receive, "timeout") is None

    def test_a_transport_of_just_the_six_methods_serves_everything_above(self):
        """The reference: adding a transport is just those six methods."""
        queue = ef.MessageQueue(transport=_SixMethodTransport())
        got = []
        queue.on("a.*", lambda message: got.append(message.payload))
        queue.publish("a.b", 1)
        assert got == [1]
        queue.on("math.add", lambda m: queue.reply(m, m.payload["a"] + m.payload["b"]))
        assert queue.request("math.add", {"a": 1, "b": 2}, timeout=5).payload == 3
        server = ef.RPCServer(queue, service_name="six")
        server.add_method("mul", lambda a, b: a * b)
        server.serve(blocking=False)
        try:
            assert ef.RPCClient(queue, service_name="six", timeout=5).mul(3, 4) == 12
        finally:
            server.stop()
            queue.close()


class _SixMethodTransport(ef.Transport):
    """A third-party transport: the six methods of the ABC and nothing else."""

    def __init__(self):
        import itertools
        import threading

        self._ids = itertools.count()
        self._subs = {}
        self._mail = []
        self._cond = threading.Condition()

    def send(self, message):
        with self._cond:
            subs = [cb for pattern, cb in self._subs.values()
                    if ef.topic_matches(pattern, message.topic)]
            if not subs:
                self._mail.append(message)
                self._cond.notify_all()
        for callback in subs:
            callback(message)

    def _take(self, topic):
        for message in self._mail:
            if ef.topic_matches(topic, message.topic):
                self._mail.remove(message)
                return message
        return None

    def receive(self, topic, timeout=None):
        with self._cond:
            found = []
            self._cond.wait_for(lambda: found.append(self._take(topic)) or found[-1], timeout)
            return found[-1] if found else None

    async def receive_async(self, topic, timeout=None):
        return self.receive(topic, timeout)

    def subscribe(self, topic, callback):
        sid = f"s{next(self._ids)}"
        with self._cond:
            self._subs[sid] = (topic, callback)
        return sid

    def unsubscribe(self, subscription_id):
        with self._cond:
            return self._subs.pop(subscription_id, None) is not None

    def close(self):
        with self._cond:
            self._subs.clear()


class TestMessageQueueApi:
    def test_signatures(self):
        mq = ef.MessageQueue
        assert _default(mq, "transport") is None
        _binds(mq.publish, None, "topic", {"p": 1}, trace="x")
        _binds(mq.subscribe, None, "topic", print)
        _binds(mq.on, None, "topic")
        _binds(mq.on, None, "topic", print)
        _binds(mq.unsubscribe, None, "handler-id")
        _binds(mq.receive, None, "topic", timeout=None)
        _binds(mq.request, None, "topic", {"p": 1}, timeout=30.0, trace="x")
        _binds(mq.reply, None, "original", {"p": 1}, trace="x")
        _binds(mq.close, None)
        assert _default(mq.receive, "timeout") is None
        assert _default(mq.request, "timeout") == 30.0

    def test_behaviour(self):
        queue = ef.MessageQueue(transport=None)
        try:
            assert isinstance(queue.transport, ef.MemoryTransport)
            got = []
            handler_id = queue.subscribe("a.*", lambda m: got.append(("sub", m.payload)))
            assert isinstance(handler_id, str)
            queue.on("a.b", lambda m: got.append(("on", m.payload)))

            @queue.on("a.**")
            def deep(message):
                got.append(("deco", message.payload, message.headers.get("trace")))

            message_id = queue.publish("a.b", 7, trace="t1")
            assert isinstance(message_id, str)
            assert sorted(got, key=repr) == sorted(
                [("sub", 7), ("on", 7), ("deco", 7, "t1")], key=repr)
            assert queue.unsubscribe(handler_id) is True
            assert queue.unsubscribe(handler_id) is False

            queue.publish("mail.box", {"x": 1})
            received = queue.receive("mail.box", timeout=1.0)
            assert isinstance(received, ef.Message) and received.payload == {"x": 1}
            assert queue.receive("mail.box", timeout=0.05) is None

            @queue.on("math.add")
            def add(message):
                assert isinstance(queue.reply(message, message.payload["a"] + 1), str)

            response = queue.request("math.add", {"a": 1}, timeout=5.0)
            assert isinstance(response, ef.Message) and response.payload == 2
            assert queue.request("nobody.home", 1, timeout=0.05) is None  # -> Message | None
        finally:
            queue.close()


class TestRemoteQueueApi:
    def test_signatures(self):
        rq = ef.RemoteQueue
        params = _params(rq)
        assert list(params)[:2] == ["node_id", "local"]
        assert params["local"].kind is inspect.Parameter.KEYWORD_ONLY
        assert params["local"].default is None
        _binds(rq.connect, None, "peer", "127.0.0.1", 9001)
        _binds(rq.connect, None, "peer", host="127.0.0.1", port=9001)
        _binds(rq.disconnect, None, "peer")
        _binds(rq.send, None, "peer", "topic", {"p": 1}, trace="x")
        _binds(rq.broadcast, None, "topic", {"p": 1}, trace="x")
        _binds(rq.subscribe, None, "topic", print)
        _binds(rq.on, None, "topic")
        _binds(rq.close, None)
        assert isinstance(inspect.getattr_static(rq, "peers"), property)

    def test_local_must_be_a_message_queue(self):
        transport = ef.MemoryTransport()
        try:
            with pytest.raises(TypeError, match=r"local=MessageQueue\(transport=\.\.\.\)"):
                ef.RemoteQueue("w", local=transport)  # the transport, not a queue over it
        finally:
            transport.close()
        with pytest.raises(TypeError, match="local must be a MessageQueue or None, not str"):
            ef.RemoteQueue("w", local="queue")
        with pytest.raises(RuntimeError, match="no local queue"):
            ef.RemoteQueue("sender").subscribe("t", print)  # a pure sender cannot receive

    def test_behaviour_over_loopback(self):
        server = ef.TCPServerTransport(host="127.0.0.1", port=0).start()
        worker = ef.RemoteQueue("w", local=ef.MessageQueue(transport=server))
        coord = ef.RemoteQueue("c")
        try:
            got = []
            sub_id = worker.subscribe("jobs", lambda m: got.append(m.payload))
            assert isinstance(sub_id, str)
            assert coord.peers == []
            coord.connect("w", host="127.0.0.1", port=server.port)
            assert coord.peers == ["w"]
            assert isinstance(coord.send("w", "jobs", 1), str)
            sent = coord.broadcast("jobs", 2)
            assert isinstance(sent, dict) and list(sent) == ["w"]
            assert all(isinstance(v, str) for v in sent.values())
            flush = getattr(coord, "flush", None)
            if flush is not None:
                flush(timeout=10)
            _wait_until(lambda: len(got) == 2)
            assert got == [1, 2]
            assert coord.disconnect("w") is True
            assert coord.disconnect("w") is False
            assert coord.peers == []
        finally:
            coord.close()
            worker.close()
            server.close()


    def test_bidirectional_with_a_local_on_both_sides(self):
        """The reference: give the coordinator a local too; the worker sends results back."""
        worker_srv = ef.TCPServerTransport(host="127.0.0.1", port=0).start()
        coord_srv = ef.TCPServerTransport(host="127.0.0.1", port=0).start()
        worker = ef.RemoteQueue("worker", local=ef.MessageQueue(transport=worker_srv))
        coord = ef.RemoteQueue("coord", local=ef.MessageQueue(transport=coord_srv))
        try:
            worker.connect("coord", host="127.0.0.1", port=coord_srv.port)
            coord.connect("worker", host="127.0.0.1", port=worker_srv.port)

            @worker.on("work")
            def run(message):
                worker.send(message.headers["source_node"], "result", message.payload * 2)

            results = []
            coord.on("result", lambda message: results.append(message.payload))
            coord.send("worker", "work", 21)
            _wait_until(lambda: results == [42])
        finally:
            coord.close()
            worker.close()
            coord_srv.close()
            worker_srv.close()


def _wait_until(condition, timeout=10.0):
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def _thread_name():
    import threading

    return threading.current_thread().name


def _square(n):
    return n * n


class TestExecutorApi:
    def test_signatures(self):
        ex = ef.Executor
        assert _default(ex, "mode") is ef.ExecutionMode.SEQUENTIAL
        assert _default(ex, "max_workers") == 4
        _binds(ex, mode=ef.ExecutionMode.SEQUENTIAL, max_workers=4)
        _binds(ex.submit, None, print, 1, 2, sep="-")
        _binds(ex.result, None, "task-id", timeout=None)
        _binds(ex.map, None, print, [1, 2], timeout=None)
        _binds(ex.start, None)
        _binds(ex.stop, None, wait=True)
        assert _default(ex.stop, "wait") is True
        assert _default(ex.result, "timeout") is None
        assert _default(ex.map, "timeout") is None
        assert {m.name for m in ef.ExecutionMode} >= {"SEQUENTIAL", "THREAD", "PROCESS"}
        for sync, name in (("submit", "submit_async"), ("result", "result_async"),
                           ("map", "map_async")):
            assert inspect.iscoroutinefunction(getattr(ex, name)), name
            assert list(_params(getattr(ex, name))) == list(_params(getattr(ex, sync))), name

    def test_sequential_runs_inline_at_submit(self):
        seen = []
        executor = ef.Executor()
        executor.start()
        try:
            task_id = executor.submit(seen.append, 1)
            assert seen == [1]  # before result() is asked for
            result = executor.result(task_id, timeout=None)
            assert isinstance(result, ef.TaskResult)
            assert result.status == ef.TaskStatus.COMPLETED and result.error is None
            assert result.execution_time >= 0
        finally:
            executor.stop(wait=True)

    def test_thread_map_and_failure_and_async(self):
        with ef.Executor(mode=ef.ExecutionMode.THREAD, max_workers=4) as executor:
            results = executor.map(_square, [1, 2, 3], timeout=30)
            assert isinstance(results, list)
            assert [r.value for r in results] == [1, 4, 9]
            failed = executor.result(executor.submit(_square, "x"), timeout=30)
            assert failed.status == ef.TaskStatus.FAILED and "TypeError" in (
                (failed.error_type or "") + (failed.error or ""))

            async def use_async():
                task_id = await executor.submit_async(_square, 5)
                one = await executor.result_async(task_id, timeout=30)
                many = await executor.map_async(_square, [2, 3], timeout=30)
                return one.value, [r.value for r in many]

            assert asyncio.run(use_async()) == (25, [4, 9])


class TestRpcApi:
    def test_signatures(self):
        assert list(_params(ef.RPCServer))[:3] == ["queue", "executor", "service_name"]
        assert _default(ef.RPCServer, "executor") is None
        assert _default(ef.RPCServer, "service_name") == "rpc"
        _binds(ef.RPCServer.register, None, name=None)
        _binds(ef.RPCServer.register, None)
        _binds(ef.RPCServer.add_method, None, "name", print)
        _binds(ef.RPCServer.serve, None, blocking=True)
        assert _default(ef.RPCServer.serve, "blocking") is True
        _binds(ef.RPCServer.stop, None)
        assert list(_params(ef.RPCClient))[:3] == ["queue", "service_name", "timeout"]
        assert _default(ef.RPCClient, "service_name") == "rpc"
        assert _default(ef.RPCClient, "timeout") == 30.0
        call = _params(ef.RPCClient.call)
        assert call["timeout"].kind is inspect.Parameter.KEYWORD_ONLY
        assert call["timeout"].default is None
        _binds(ef.RPCClient.call, None, "method", 1, 2, timeout=None, key="word")
        _binds(ef.RoundRobinRPCClient, [object(), object()])
        _binds(ef.with_retry, object(), max_retries=3)
        assert _default(ef.with_retry, "max_retries") == 3

    def test_behaviour(self):
        queue = ef.MessageQueue()
        server = ef.RPCServer(queue, service_name="calc")

        @server.register()
        def add(a, b=0):
            return a + b

        @server.register("twice")
        def double(x):
            return 2 * x

        server.register(name="neg")(lambda x: -x)
        server.add_method("pid", os.getpid)
        server.serve(blocking=False)
        try:
            one = ef.RPCClient(queue, service_name="calc", timeout=30.0)
            two = ef.RPCClient(queue, service_name="calc")
            assert one.call("add", 1, b=2, timeout=5) == 3
            assert one.add(1, 2) == 3 and one.twice(4) == 8 and one.neg(1) == -1
            assert one.pid() == os.getpid()
            pool = ef.RoundRobinRPCClient([one, two])
            assert pool.call("add", 2, 3) == 5 and pool.twice(5) == 10
            retrying = ef.with_retry(one, max_retries=3)
            assert retrying.call("add", 4, 4) == 8 and retrying.neg(2) == -2
            with pytest.raises(ef.MethodNotFoundError):
                one.call("nope")
        finally:
            server.stop()
            queue.close()

    @pytest.mark.parametrize("mode", ["thread", "process"])
    def test_server_runs_methods_on_the_given_executor(self, mode):
        queue = ef.MessageQueue()
        executor = ef.Executor(mode=ef.ExecutionMode(mode), max_workers=2)
        server = ef.RPCServer(queue, executor=executor, service_name="pooled")
        server.add_method("pid", os.getpid)
        server.serve(blocking=False)
        try:
            client = ef.RPCClient(queue, service_name="pooled", timeout=30)
            assert (client.pid() == os.getpid()) is (mode == "thread")
            if mode == "thread":  # not inline in the caller, as it would be without one
                server.add_method("thread", _thread_name)
                assert client.thread() != _thread_name()
        finally:
            server.stop()
            executor.stop()
            queue.close()

    def test_round_robin_spreads_over_the_pool(self):
        queues = [ef.MessageQueue(), ef.MessageQueue()]
        servers = []
        for name, queue in zip("ab", queues):
            server = ef.RPCServer(queue, service_name="w")
            server.add_method("who", lambda name=name: name)
            server.serve(blocking=False)
            servers.append(server)
        try:
            pool = ef.RoundRobinRPCClient([ef.RPCClient(q, service_name="w") for q in queues])
            assert sorted(pool.who() for _ in range(4)) == ["a", "a", "b", "b"]
            assert sorted(pool.call("who") for _ in range(2)) == ["a", "b"]
        finally:
            for server in servers:
                server.stop()
            for queue in queues:
                queue.close()

    def test_with_retry_retries_then_gives_up(self):
        class LateTwice:
            calls = 0

            def call(self, method, *args, **kwargs):
                self.calls += 1
                if self.calls <= 2:
                    raise TimeoutError("late")
                return method, args, kwargs

        client = LateTwice()
        retrying = ef.with_retry(client, max_retries=3, backoff_initial=0.001)
        assert retrying.call("m", 1, x=2) == ("m", (1,), {"x": 2})
        assert client.calls == 3
        client = LateTwice()
        with pytest.raises(TimeoutError):
            ef.with_retry(client, max_retries=1, backoff_initial=0.001).m()
        assert client.calls == 2  # the first try and one retry
        queue = ef.MessageQueue()  # nobody serves: a real RPC timeout is retried too
        try:
            retries = []
            nobody = ef.with_retry(ef.RPCClient(queue, service_name="none", timeout=0.05),
                                   max_retries=2, backoff_initial=0.001,
                                   on_retry=lambda attempt, exc, delay: retries.append(attempt))
            with pytest.raises(ef.RPCTimeoutError):
                nobody.anything()
            assert retries == [1, 2]
        finally:
            queue.close()

    def test_serve_blocking_returns_on_stop(self):
        import threading

        queue = ef.MessageQueue()
        server = ef.RPCServer(queue)
        server.add_method("one", lambda: 1)
        serving = threading.Thread(target=server.serve, kwargs={"blocking": True},
                                   name="test-rpc-serve")
        serving.start()
        try:
            assert ef.RPCClient(queue, timeout=10).one() == 1  # service_name "rpc" both sides
        finally:
            server.stop()
            serving.join(10)
            queue.close()
        assert not serving.is_alive()


class TestTaskAndObserverApi:
    def test_task_signature(self):
        params = _params(ef.task)
        expected = {"queue": None, "topic": None, "executor": None, "on_execute": None,
                    "on_success": None, "on_failure": None, "on_complete": None,
                    "publish_result": True, "max_instances": None, "instance_timeout": None}
        for name, default in expected.items():
            assert name in params, name
            assert params[name].default == default, name

    def test_state_and_pool_stats(self):
        @ef.task(max_instances=2)
        def capped(x):
            return x + 1

        assert capped(21) == 22
        assert isinstance(capped.state, ef.SharedState)
        stats = capped.pool.stats
        assert isinstance(stats, dict) and stats["max"] == 2

    def test_topic_defaults_to_the_name_and_results_are_published(self):
        queue = ef.MessageQueue()
        try:
            seen = []
            queue.on("double.*", lambda m: seen.append((m.topic, m.payload.get("result"))))

            @ef.task(queue=queue, on_complete=lambda ctx: seen.append("complete"))
            def double(x):
                if x < 0:
                    raise ValueError("negative")
                return 2 * x

            assert double(2) == 4
            with pytest.raises(ValueError):
                double(-1)
            queue.publish("double", 5)  # the topic defaults to the function name
            assert seen == [("double.success", 4), "complete", ("double.failure", None),
                            "complete", ("double.success", 10), "complete"]
        finally:
            queue.close()

    def test_task_observers_run_around_calls_served_over_rpc(self):
        timing, metrics = ef.TimingMeter(), ef.MetricsMeter()

        @ef.task(on_execute=[timing, metrics])
        def predict(x):
            return x * 2

        queue = ef.MessageQueue()
        server = ef.RPCServer(queue, service_name="ml")
        server.add_method("predict", predict)
        server.serve(blocking=False)
        try:
            assert ef.RPCClient(queue, service_name="ml", timeout=10).call("predict", 2) == 4
        finally:
            server.stop()
            queue.close()
        assert timing.stats["count"] == 1
        assert metrics.stats == {"calls": 1, "successes": 1, "failures": 0}

    def test_metrics_meter_extractor_and_timing_threshold(self, caplog):
        import time

        metrics = ef.MetricsMeter(extract=lambda result: result["score"])
        timing = ef.TimingMeter(threshold=0.001)

        @ef.task(on_execute=[metrics, timing])
        def scored(x):
            time.sleep(0.01)
            return {"score": x}

        with caplog.at_level("WARNING", logger="eventforge"):
            scored(1)
            scored(3)
        assert metrics.stats["value"] == 2.0 and metrics.stats["calls"] == 2
        assert timing.stats["over_threshold"] == 2
        assert any("threshold" in record.getMessage() for record in caplog.records)

    def test_observers_named_by_the_reference(self):
        for name in ("Meter", "TimingMeter", "MemoryMeter", "CPUMeter", "MetricsMeter",
                     "LoggingReporter", "Observable", "Eventful", "Dispatcher",
                     "BroadcastDispatcher", "RoundRobinDispatcher", "ConcurrentDispatcher",
                     "LeastLoadedDispatcher", "Node", "TaskContext", "observe"):
            assert hasattr(ef, name), name
            assert name in ef.__all__, name
        _binds(ef.TimingMeter, threshold=1.0)
        assert _default(ef.TimingMeter, "reduction") == "mean"
        assert _default(ef.MemoryMeter, "reduction") == "max"
        assert _default(ef.CPUMeter, "reduction") == "mean"
        for reduction in ("mean", "max", "min", "sum", "last", "count"):
            meter = ef.Meter(reduction=reduction)
            for value in (3.0, 1.0, 2.0):
                meter.update(value)
            assert set(meter.stats) == {"value", "count"}, reduction
            assert meter.stats["count"] == 3
            assert meter.stats["value"] == {"mean": 2.0, "max": 3.0, "min": 1.0, "sum": 6.0,
                                            "last": 2.0, "count": 3}[reduction]
        assert ef.TimingMeter(reduction="max").reduction == "max"  # a default you can override


# ---------------------------------------------------------------------------
# 2. the reference's code samples, verbatim
# ---------------------------------------------------------------------------

WORKER_COMMAND = "python -m eventforge.worker --import handlers --service math --port 9090"


def _stats_line(line):
    import ast

    return ast.literal_eval(line)


class TestSamples:
    def test_message_queue(self, tmp_path):
        lines = _run_sample(tmp_path, SAMPLE_MESSAGE_QUEUE)
        assert lines == ["Received: events.user -> {'action': 'login', 'user': 'alice'}", "30"]

    def test_transports(self, tmp_path):
        reason = _port_holder(9090, "127.0.0.1")
        if reason:
            pytest.skip(reason)
        redis = None
        if not _listening(6379):
            if find_binary("redis-server") is None:
                pytest.skip("redis-server is not installed and nothing listens on 6379")
            redis = RedisServer(port=6379).start()
        try:
            lines = _run_sample(tmp_path, SAMPLE_TRANSPORTS,
                                show=("local", "networked", "brokered"))
            # The script prints nothing itself; it must build all three queues and
            # exit on its own although it closes nothing.
            assert [line.split("=")[0] for line in lines] == ["@local", "@networked", "@brokered"]
            assert all("MessageQueue" in line for line in lines), lines
        finally:
            if redis is not None:
                redis.stop()

    def test_remote_queue_delivers_without_close(self, tmp_path):
        reason = _port_holder(9001)
        if reason:
            pytest.skip(reason)
        out = "\n".join(_run_sample(tmp_path, SAMPLE_REMOTE_QUEUE))
        # The worker prints from its handler thread while the script prints from the
        # main one, so the lines may come in any order (even share a line: print
        # writes the text and the newline separately); each must come exactly once.
        expected = ["worker got: {'task': 42}", "worker got: {'task': 99}", "['worker-1']"]
        assert [out.count(text) for text in expected] == [1, 1, 1], out
        assert out.index(expected[0]) < out.index(expected[1]), out
        for text in expected:
            out = out.replace(text, "")
        assert not out.strip(), f"unexpected output: {out!r}"

    def test_a_pure_sender_process_delivers_everything_without_close(self, tmp_path):
        """The sample's promise across processes: a send that returned survives exit."""
        server = ef.TCPServerTransport(host="127.0.0.1", port=0).start()
        queue = ef.MessageQueue(transport=server)
        try:
            got = []
            queue.subscribe("work", lambda message: got.append(message.payload["i"]))
            code = textwrap.dedent(
                f"""
                from eventforge import RemoteQueue
                coord = RemoteQueue("coordinator")
                coord.connect("sink", host="127.0.0.1", port={server.port})
                for i in range(2000):
                    coord.send("sink", "work", {{"i": i}})
                coord.broadcast("work", {{"i": "last"}})
                """)
            assert _run_sample(tmp_path, code) == []
            # Handled before the sender's exit completed: no waiting needed here.
            assert got == [*range(2000), "last"]
        finally:
            queue.close()
            server.close()

    def test_executor_thread_and_process(self, tmp_path):
        lines = _run_sample(tmp_path, SAMPLE_EXECUTOR)
        assert lines == [str(sum(range(n))) for n in (1_000_000, 100_000, 200_000, 300_000)]

    def test_rpc(self, tmp_path):
        assert _run_sample(tmp_path, SAMPLE_RPC) == ["30", "30"]

    def test_task_with_queue_and_executor(self, tmp_path):
        lines = _run_sample(tmp_path, SAMPLE_TASK, show=("result",))
        assert lines[:2] == ["Done: HELLO", "Done: WORLD"]
        stats = _stats_line(lines[2])
        assert stats["count"] == 2 and {"avg"} <= set(stats)
        assert lines[3:] == ["@result='HELLO'"]

    def test_task_served_over_rpc(self, tmp_path):
        assert _run_sample(tmp_path, SAMPLE_TASK_RPC, show=("result",)) == ["@result=4"]

    def test_observers(self, tmp_path):
        lines = _run_sample(tmp_path, SAMPLE_OBSERVERS, show=("simple_function",))
        timing = _stats_line(lines[0])
        assert timing["count"] == 2 and {"avg", "min", "max"} <= set(timing)
        assert _stats_line(lines[1]) == {"calls": 2, "successes": 2, "failures": 0}
        assert lines[2].startswith("@simple_function=")

    def test_task_reference_block(self, tmp_path):
        # The block is the decorator's reference card; the import is the only addition.
        code = "from eventforge import task\n" + SAMPLE_TASK_REFERENCE
        lines = _run_sample(tmp_path, code, show=("my_task",))
        assert len(lines) == 1 and lines[0].startswith("@my_task=")

    def test_worker_command_line(self, tmp_path):
        reason = _port_holder(9090, "127.0.0.1")
        if reason:
            pytest.skip(reason)
        (tmp_path / "handlers.py").write_text(textwrap.dedent(
            """
            def compute(x, y=1):
                return x * y

            HANDLERS = {"compute": compute};  SERVICE_NAME = "math"
            """))
        args = WORKER_COMMAND.split()
        assert args[:3] == ["python", "-m", "eventforge.worker"]
        worker = Worker(*args[3:], cwd=str(tmp_path), module=("eventforge.worker",))
        try:
            assert worker.service == "math" and worker.port == 9090
            transport = ef.TCPClientTransport("127.0.0.1", 9090).connect(timeout=10)
            queue = ef.MessageQueue(transport)
            try:
                client = ef.RPCClient(queue, service_name="math", timeout=10)
                assert client.call("compute", 6, 7) == 42
                assert client.compute(5) == 5
            finally:
                queue.close()
            assert worker.stop() == 0
        finally:
            worker.close()


def test_files_and_extras_the_reference_points_at():
    for relative in ("docs/observers.md", "deploy/README.md", "deploy/docker-compose.yml",
                     "deploy/Dockerfile"):
        assert os.path.isfile(os.path.join(REPO, relative)), relative
    deploy = os.listdir(os.path.join(REPO, "deploy"))
    assert any(name.endswith(".def") for name in deploy), "no Apptainer definition in deploy/"
    with open(os.path.join(REPO, "pyproject.toml"), encoding="utf-8") as fh:
        pyproject = fh.read()
    for extra in ("redis", "nats", "logfire"):  # pip install eventforge[EXTRA]
        assert re.search(rf"^{extra} = \[", pyproject, re.MULTILINE), extra


REFERENCE_TEXT = os.environ.get("EVENTFORGE_REFERENCE",
                                "/work/shared/reference/eventforge-README.txt")


@pytest.mark.skipif(not os.path.isfile(REFERENCE_TEXT),
                    reason="the reference README is not on this machine (set EVENTFORGE_REFERENCE)")
def test_samples_are_verbatim_copies_of_the_reference():
    import _reference_samples

    with open(REFERENCE_TEXT, encoding="utf-8") as fh:
        reference = fh.read()
    names = [name for name in dir(_reference_samples) if name.startswith("SAMPLE_")]
    assert len(names) == 9
    for name in names:
        assert getattr(_reference_samples, name).strip() in reference, name
    assert WORKER_COMMAND in reference


def test_samples_import_from_the_checkout():
    assert child_env()["PYTHONPATH"].split(os.pathsep)[0] == REPO
