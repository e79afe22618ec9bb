"""RPCServer, RPCClient, RoundRobinRPCClient and with_retry over MemoryTransport.

The same classes over real TCP sockets are tested in test_worker_cli.py and
in the TCP section at the bottom of this file.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import os
import pickle
import threading
import time

import pytest
from _reference_samples import SAMPLE_RPC
from _worker_helpers import assert_no_leaks, leak_snapshot

import eventforge as ef
from eventforge import (
    ExecutionMode,
    Executor,
    Message,
    MessageQueue,
    RoundRobinRPCClient,
    RPCClient,
    RPCServer,
    with_retry,
)

SLACK = 2.0


@pytest.fixture(autouse=True)
def no_leaks():
    before = leak_snapshot()
    yield
    assert_no_leaks(before)


@pytest.fixture
def queue():
    q = MessageQueue()
    yield q
    q.close()


def add(a, b):
    return a + b


def boom(message="boom"):
    raise ValueError(message)


def getpid():
    return os.getpid()


@pytest.fixture
def calc(queue):
    server = RPCServer(queue, service_name="calculator")
    server.add_method("add", add)
    server.add_method("boom", boom)
    server.serve(blocking=False)
    yield server, RPCClient(queue, service_name="calculator", timeout=5.0)
    server.stop()


def leftovers(queue):
    stats = queue.transport.stats
    return stats["mailboxes"], stats["inboxes"], stats["receivers"]


class TestCalls:
    def test_readme_example(self, capsys):
        # The reference's sample, in-process (test_reference_api runs it as a script).
        exec(compile(SAMPLE_RPC, "reference", "exec"), {"__name__": "reference"})
        assert capsys.readouterr().out.splitlines() == ["30", "30"]

    def test_register_forms(self, queue):
        server = RPCServer(queue)

        @server.register
        def bare():
            return "bare"

        @server.register("renamed")
        def original():
            return "renamed"

        server.add_method("partial", functools.partial(add, 1))

        class Callable:  # e.g. a @task-decorated function object
            def __call__(self, x):
                return x * 2

        server.add_method("obj", Callable())
        assert server.methods == ["bare", "obj", "partial", "renamed"]
        with server:
            client = RPCClient(queue)
            assert client.bare() == "bare"
            assert client.renamed() == "renamed"
            assert client.partial(2) == 3
            assert client.obj(21) == 42
            with pytest.raises(ef.MethodNotFoundError):
                client.original()
        assert server.remove_method("obj") and not server.remove_method("obj")

    def test_kwargs_and_json_shapes(self, calc):
        _, client = calc
        assert client.add(a=[1], b=[2]) == [1, 2]
        assert client.call("add", {"x": None}.get("x") or 0, b=0) == 0
        assert client.invoke("add", kwargs={"a": "x", "b": "y"}) == "xy"

    def test_user_kwarg_named_timeout_via_invoke(self, queue):
        server = RPCServer(queue)
        server.add_method("echo", lambda timeout=None, method=None: [timeout, method])
        with server:
            client = RPCClient(queue)
            echoed = client.invoke("echo", kwargs={"timeout": 7, "method": "m"}, timeout=5)
            assert echoed == [7, "m"]
            assert client.call("echo", timeout=5) == [None, None]  # call()'s own timeout

    def test_remote_error(self, calc):
        _, client = calc
        with pytest.raises(ef.RemoteError) as info:
            client.boom("kaput")
        err = info.value
        assert str(err) == "ValueError: kaput"
        assert (err.remote_type, err.remote_message) == ("ValueError", "kaput")
        assert "in boom" in err.remote_traceback
        assert not isinstance(err, ef.MethodNotFoundError)
        assert isinstance(err, ef.EventforgeError)

    def test_method_not_found(self, calc):
        _, client = calc
        with pytest.raises(ef.MethodNotFoundError, match="Method not found: divide"):
            client.divide(1, 2)

    def test_timeout_without_server_leaves_nothing(self, queue):
        client = RPCClient(queue, service_name="nobody", timeout=0.2)
        start = time.monotonic()
        with pytest.raises(ef.RPCTimeoutError) as info:
            client.ping()
        assert 0.2 <= time.monotonic() - start < 0.2 + SLACK
        assert isinstance(info.value, TimeoutError)
        assert "nobody" in str(info.value) and "ping" in str(info.value)
        # The reply inbox is gone.  (The request itself waits in the
        # "nobody.request" mailbox, as any message nobody consumed does.)
        assert leftovers(queue)[1:] == (0, 0)

    def test_late_reply_is_discarded(self, queue):
        gate = threading.Event()
        with Executor(ExecutionMode.THREAD, max_workers=2) as executor:
            server = RPCServer(queue, executor=executor, service_name="slow")
            server.add_method("wait", lambda: gate.wait(10))
            with server:
                client = RPCClient(queue, service_name="slow")
                with pytest.raises(ef.RPCTimeoutError):
                    client.call("wait", timeout=0.1)
                dropped = queue.transport.stats["dropped"]
                gate.set()
                deadline = time.monotonic() + 5
                while server.stats["in_flight"] and time.monotonic() < deadline:
                    time.sleep(0.01)
        assert queue.transport.stats["dropped"] == dropped + 1
        assert leftovers(queue) == (0, 0, 0)

    def test_many_calls_leave_nothing(self, calc, queue):
        _, client = calc
        for i in range(5000):
            assert client.add(i, 1) == i + 1
        assert leftovers(queue) == (0, 0, 0)
        assert calc[0].stats["succeeded"] == 5000

    def test_closed_transport(self, queue):
        client = RPCClient(queue, service_name="x", timeout=5)
        queue.close()
        with pytest.raises(ef.TransportClosedError):
            client.ping()

    def test_validation(self, queue):
        with pytest.raises(ValueError, match="service_name"):
            RPCServer(queue, service_name="")
        with pytest.raises(ef.TopicError, match="service_name"):
            RPCClient(queue, service_name="a.*")
        with pytest.raises(ef.TopicError):
            RPCServer(queue, service_name="has space")
        server = RPCServer(queue)
        with pytest.raises(TypeError, match="callable"):
            server.add_method("x", 3)
        with pytest.raises(ValueError, match="method name"):
            server.add_method("", add)

        async def coro():
            return 1

        with pytest.raises(TypeError, match="coroutine"):
            server.add_method("coro", coro)
        with pytest.raises(TypeError, match="Executor"):
            RPCServer(queue, executor=object())
        with pytest.raises(TypeError, match="method"):
            RPCClient(queue).call(None)


class TestWire:
    def test_request_and_response_payloads_match_the_original(self, calc, queue):
        seen = []
        queue.subscribe("calculator.request", seen.append)
        inbox_topic = "_rpc_reply.abc"
        with queue.transport.open_inbox(inbox_topic) as inbox:
            queue.send(Message("calculator.request",
                               {"id": "abc", "method": "add", "args": [1, 2], "kwargs": {},
                                "timeout": 5.0},
                               reply_to=inbox_topic))
            reply = inbox.get(5)
        assert reply.payload.keys() == {"id", "request_id", "result", "error", "error_type"}
        assert reply.payload["request_id"] == "abc"
        assert reply.payload["result"] == 3 and reply.payload["error"] is None
        assert reply.correlation_id == seen[0].id

        # and what our client sends
        calc[1].add(4, 5)
        request = seen[-1]
        assert request.payload.keys() == {"id", "method", "args", "kwargs", "timeout"}
        assert request.reply_to == "_rpc_reply." + request.payload["id"]
        assert request.payload["args"] == [4, 5] and request.payload["timeout"] == 5.0

    def test_error_response_shape(self, calc, queue):
        with queue.transport.open_inbox("_rpc_reply.e1") as inbox:
            queue.send(Message("calculator.request", {"id": "e1", "method": "boom", "args": []},
                               reply_to="_rpc_reply.e1"))
            payload = inbox.get(5).payload
        assert (payload["error_type"], payload["error"]) == ("ValueError", "boom")
        assert payload["result"] is None and "Traceback" in payload["traceback"]

    def test_client_talks_to_an_original_style_server(self, queue):
        @queue.on("legacy.request")
        def legacy(message):
            req = message.payload
            if req["method"] == "neg":
                response = {"id": "r", "request_id": req["id"], "result": -req["args"][0],
                            "error": None, "error_type": None}
            else:
                response = {"id": "r", "request_id": req["id"], "result": None,
                            "error": f"Method not found: {req['method']}",
                            "error_type": "ValueError"}
            queue.send(Message(message.reply_to, response))

        client = RPCClient(queue, service_name="legacy", timeout=5)
        assert client.neg(3) == -3
        with pytest.raises(ef.MethodNotFoundError, match="Method not found: pos"):
            client.pos(3)

    def test_invalid_requests(self, calc, queue, caplog):
        server, _ = calc
        with queue.transport.open_inbox("_rpc_reply.bad") as inbox:
            queue.send(Message("calculator.request", ["not", "an", "object"],
                               reply_to="_rpc_reply.bad"))
            payload = inbox.get(5).payload
            assert payload["error_type"] == "InvalidRequest"
            queue.send(Message("calculator.request", {"method": "add", "args": "12"},
                               reply_to="_rpc_reply.bad"))
            assert "'args' must be a list" in inbox.get(5).payload["error"]
        queue.publish("calculator.request", {"nope": 1})  # no reply_to: logged and counted
        assert server.stats["invalid"] == 3
        assert "invalid request" in caplog.text

    def test_no_reply_to_still_runs(self, queue):
        seen = []
        server = RPCServer(queue)
        server.add_method("note", seen.append)
        with server:
            queue.publish("rpc.request", {"id": "n", "method": "note", "args": ["hi"]})
        assert seen == ["hi"]


class TestIntrospection:
    def test_dunders_and_probes_stay_local(self, calc):
        server, client = calc
        before = server.stats["requests"]
        assert not hasattr(client, "__iter__")
        assert not hasattr(client, "__len__")
        assert not hasattr(client, "_repr_html_")
        assert not hasattr(client, "_ipython_canary_method_should_not_exist_")
        assert not hasattr(client, "getdoc")
        assert not hasattr(client, "__array__")
        with pytest.raises(TypeError):
            len(client)
        with pytest.raises(TypeError):
            iter(client)
        with pytest.raises(TypeError, match="cannot be pickled"):
            pickle.dumps(client)
        with pytest.raises(TypeError, match="cannot be pickled or copied"):
            copy.copy(client)
        repr(client), str(client), dir(client)
        method = client.anything
        assert isinstance(method, ef.RemoteMethod) and method.__name__ == "anything"
        assert "anything" in repr(method)
        assert server.stats["requests"] == before  # nothing was sent

    def test_round_robin_and_retry_too(self, calc):
        _, client = calc
        for wrapper in (RoundRobinRPCClient([client]), with_retry(client)):
            assert not hasattr(wrapper, "__iter__") and not hasattr(wrapper, "_repr_html_")
            assert wrapper.add(1, 2) == 3


class TestStats:
    @pytest.mark.parametrize("threaded", [False, True])
    def test_a_call_is_counted_before_its_reply_leaves(self, queue, threaded):
        # Regression: "succeeded" used to be counted after the reply was sent,
        # so a caller holding its result could read stats one call short
        # (TestOverTCP::test_replies_reach_only_their_caller saw 299 of 300).
        seen = []
        send = queue.send

        def spy(message):  # inbox topics are private: no pattern sees replies
            if message.topic.startswith(ef.RPC_REPLY_PREFIX):
                seen.append(dict(server.stats))
            return send(message)

        queue.send = spy
        executor = Executor(ExecutionMode.THREAD, max_workers=1) if threaded else None
        try:
            server = RPCServer(queue, executor=executor)
            server.add_method("add", add)
            server.add_method("boom", boom)
            with server:
                client = RPCClient(queue, timeout=10)
                assert client.add(1, 2) == 3
                with pytest.raises(ef.RemoteError):
                    client.boom()
            # The reply subscriber ran while each reply was being sent.
            assert [(s["succeeded"], s["failed"]) for s in seen] == [(1, 0), (1, 1)]
            assert all(s["in_flight"] == 1 for s in seen)  # the call is still finishing
        finally:
            if executor is not None:
                executor.stop()


class TestExecutor:
    def test_slow_method_does_not_block_other_callers(self, queue):
        gate = threading.Event()
        with Executor(ExecutionMode.THREAD, max_workers=4) as executor:
            server = RPCServer(queue, executor=executor)
            server.add_method("slow", lambda: gate.wait(10))
            server.add_method("fast", lambda: threading.current_thread().name)
            with server:
                client = RPCClient(queue, timeout=10)
                results = []
                slow = threading.Thread(target=lambda: results.append(client.slow()))
                slow.start()
                time.sleep(0.05)
                assert client.fast().startswith("eventforge-executor")
                assert not results  # the slow call is still running
                gate.set()
                slow.join(10)
                assert results == [True]

    def test_process_executor(self, queue):
        with Executor(ExecutionMode.PROCESS, max_workers=1) as executor:
            with RPCServer(queue, executor=executor) as server:
                server.add_method("getpid", getpid)
                server.add_method("boom", boom)
                server.add_method("lambda", lambda: 1)
                client = RPCClient(queue, timeout=30)
                assert client.getpid() != os.getpid()
                with pytest.raises(ef.RemoteError, match="ValueError: boom"):
                    client.boom()
                with pytest.raises(ef.RemoteError) as info:
                    client.call("lambda")
                assert "pickle" in str(info.value).lower()

    def test_sequential_executor(self, queue):
        with RPCServer(queue, executor=Executor()) as server:
            server.add_method("add", add)
            assert RPCClient(queue).add(2, 2) == 4

    def test_concurrent_callers(self, queue):
        with Executor(ExecutionMode.THREAD, max_workers=4) as executor:
            with RPCServer(queue, executor=executor) as server:
                server.add_method("add", add)
                client = RPCClient(queue, timeout=10)
                errors = []

                def worker(base):
                    for i in range(200):
                        if client.add(base, i) != base + i:
                            errors.append((base, i))

                threads = [threading.Thread(target=worker, args=(n * 1000,)) for n in range(8)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(30)
                assert not errors and server.stats["succeeded"] == 1600
        assert leftovers(queue) == (0, 0, 0)


def _call_in_background(server, client, method):
    """Call ``method`` from another thread; return once the server has it in flight."""
    results = []
    caller = threading.Thread(target=lambda: results.append(client.call(method)))
    caller.start()
    deadline = time.monotonic() + 5
    while server.stats["in_flight"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    return caller, results


class TestLifecycle:
    def test_stop_waits_for_calls_in_flight(self, queue):
        gate = threading.Event()
        with Executor(ExecutionMode.THREAD, max_workers=2) as executor:
            server = RPCServer(queue, executor=executor)
            server.add_method("wait", lambda: gate.wait(10) and "done")
            server.serve(blocking=False)
            client = RPCClient(queue, timeout=10)
            caller, results = _call_in_background(server, client, "wait")
            threading.Timer(0.1, gate.set).start()
            server.stop(timeout=10)
            assert server.stats["in_flight"] == 0 and not server.serving
            caller.join(10)
            assert results == ["done"]
            with pytest.raises(ef.RPCTimeoutError):
                client.call("wait", timeout=0.1)

    def test_stop_from_inside_a_method(self, queue):
        server = RPCServer(queue)
        server.add_method("shutdown", lambda: server.stop(timeout=5) or "bye")
        server.serve(blocking=False)
        start = time.monotonic()
        assert RPCClient(queue, timeout=5).shutdown() == "bye"
        assert time.monotonic() - start < SLACK and not server.serving

    def test_stop_from_inside_a_method_waits_only_for_the_other_calls(self, queue):
        # The inner stop() waits for in_flight to fall to 1 (its own call): it
        # must be woken when the other call ends, not sit out its timeout.
        gate = threading.Event()
        with Executor(ExecutionMode.THREAD, max_workers=2) as executor:
            server = RPCServer(queue, executor=executor)
            server.add_method("slow", lambda: gate.wait(10) and "slow done")
            took = []

            def shutdown():
                start = time.monotonic()
                server.stop(timeout=8)
                took.append(time.monotonic() - start)
                return "bye"

            server.add_method("shutdown", shutdown)
            server.serve(blocking=False)
            client = RPCClient(queue, timeout=10)
            caller, results = _call_in_background(server, client, "slow")
            threading.Timer(0.2, gate.set).start()
            assert client.shutdown() == "bye"
            caller.join(10)
        assert results == ["slow done"] and not server.serving
        assert 0.1 <= took[0] < 0.2 + SLACK

    def test_blocking_serve_returns_on_stop(self, queue):
        server = RPCServer(queue)
        server.add_method("add", add)
        threading.Timer(0.2, server.stop).start()
        start = time.monotonic()
        server.serve(blocking=True)
        assert time.monotonic() - start < 0.2 + SLACK

    def test_blocking_serve_returns_on_ctrl_c(self, queue):
        import _thread

        server = RPCServer(queue)
        threading.Timer(0.2, _thread.interrupt_main).start()
        server.serve(blocking=True)  # returns instead of raising KeyboardInterrupt
        assert not server.serving

    def test_restart(self, queue):
        server = RPCServer(queue)
        server.add_method("add", add)
        client = RPCClient(queue, timeout=5)
        for _ in range(2):
            server.serve(blocking=False)
            server.serve(blocking=False)  # idempotent
            assert client.add(1, 1) == 2
            server.stop()
        assert queue.transport.stats["subscriptions"] == 0


class TestAsync:
    def test_call_async(self, calc):
        _, client = calc

        async def go():
            results = await asyncio.gather(*(client.call_async("add", i, i) for i in range(20)))
            direct = await client.add.call_async(1, 2)
            with pytest.raises(ef.RemoteError):
                await client.call_async("boom")
            return results, direct

        results, direct = asyncio.run(go())
        assert results == [2 * i for i in range(20)] and direct == 3

    def test_call_async_timeout_and_cancel(self, queue):
        client = RPCClient(queue, service_name="nobody")

        async def go():
            start = time.monotonic()
            with pytest.raises(ef.RPCTimeoutError):
                await client.call_async("x", timeout=0.2)
            elapsed = time.monotonic() - start
            task = asyncio.ensure_future(client.call_async("x", timeout=10))
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return elapsed

        assert 0.2 <= asyncio.run(go()) < 0.2 + SLACK
        assert leftovers(queue)[1:] == (0, 0)


class FlakyClient:
    """Anything with call(): fails ``failures`` times, then answers."""

    def __init__(self, failures, exc=None):
        self.failures = failures
        self.exc = exc if exc is not None else ef.RPCTimeoutError("no reply")
        self.calls = []

    def call(self, method, *args, **kwargs):
        self.calls.append((method, args, kwargs))
        if len(self.calls) <= self.failures:
            raise self.exc
        return f"{method}{args}"


class TestRoundRobin:
    def test_spreads_calls_in_turn(self):
        queues = [MessageQueue() for _ in range(3)]
        servers = []
        for n, q in enumerate(queues):
            s = RPCServer(q, service_name="math")
            s.add_method("who", functools.partial(lambda n: n, n))
            s.serve(blocking=False)
            servers.append(s)
        rr = RoundRobinRPCClient([RPCClient(q, service_name="math") for q in queues])
        assert [rr.who() for _ in range(9)] == [0, 1, 2] * 3
        assert len(rr) == 3
        for s, q in zip(servers, queues):
            s.stop()
            q.close()

    def test_any_object_with_call(self):
        a, b = FlakyClient(0), FlakyClient(0)
        rr = RoundRobinRPCClient([a, b])
        assert rr.call("f", 1, timeout=3) == "f(1,)"
        rr.g(2)
        assert a.calls == [("f", (1,), {"timeout": 3})] and b.calls == [("g", (2,), {})]
        assert asyncio.run(rr.call_async("h")) == "h()"  # no call_async: runs in a thread

    def test_validation(self):
        with pytest.raises(ValueError, match="at least one"):
            RoundRobinRPCClient([])
        with pytest.raises(TypeError, match="no call"):
            RoundRobinRPCClient([object()])


class TestRetry:
    def test_retries_then_succeeds(self):
        seen = []
        client = with_retry(FlakyClient(2), max_retries=3, backoff_initial=0.01,
                            on_retry=lambda n, exc, delay: seen.append((n, type(exc), delay)))
        assert client.call("f", 1) == "f(1,)"
        assert [n for n, _, _ in seen] == [1, 2] and client.retries == 2
        assert all(t is ef.RPCTimeoutError for _, t, _ in seen)

    def test_gives_up_with_the_last_error(self):
        flaky = FlakyClient(10, ConnectionRefusedError("down"))
        with pytest.raises(ConnectionRefusedError):
            with_retry(flaky, max_retries=2, backoff_initial=0.001).call("f")
        assert len(flaky.calls) == 3

    def test_remote_errors_are_not_retried(self):
        flaky = FlakyClient(1, ef.RemoteError("ValueError", "bad"))
        with pytest.raises(ef.RemoteError):
            with_retry(flaky, backoff_initial=0.001).call("f")
        assert len(flaky.calls) == 1
        flaky = FlakyClient(1, ef.RemoteError("ValueError", "bad"))
        assert with_retry(flaky, backoff_initial=0.001, retry_on=ef.RemoteError).call("f") == "f()"

    def test_delay_cap_and_jitter(self):
        client = with_retry(FlakyClient(0), backoff_initial=0.1, backoff_factor=2.0,
                            backoff_max=1.0, jitter=0.5)
        for attempt in range(50):
            expected = min(0.1 * 2 ** attempt, 1.0)
            assert expected * 0.5 <= client.delay(attempt) <= expected
        assert client.delay(10_000) <= 1.0  # no overflow
        exact = with_retry(FlakyClient(0), backoff_initial=0.1, jitter=0)
        assert [exact.delay(n) for n in range(3)] == [0.1, 0.2, 0.4]

    def test_failover_with_round_robin(self):
        alive, dead = MessageQueue(), MessageQueue()
        server = RPCServer(alive)
        server.add_method("add", add)
        server.serve(blocking=False)
        rr = RoundRobinRPCClient([RPCClient(dead, timeout=0.05), RPCClient(alive, timeout=5)])
        client = with_retry(rr, max_retries=1, backoff_initial=0.001)
        assert [client.add(1, 2) for _ in range(4)] == [3] * 4
        assert client.retries == 4  # each call met the dead worker first, then failed over
        server.stop()
        alive.close()
        dead.close()

    def test_call_async(self):
        client = with_retry(FlakyClient(1), backoff_initial=0.001)
        assert asyncio.run(client.call_async("f", 2)) == "f(2,)"

    @pytest.mark.parametrize("kwargs", [
        {"max_retries": -1}, {"backoff_initial": -1}, {"backoff_factor": 0.5},
        {"jitter": 2}, {"backoff_max": "x"},
    ])
    def test_validation(self, kwargs):
        with pytest.raises(ValueError):
            with_retry(FlakyClient(0), **kwargs)

    def test_retry_on_must_be_exceptions(self):
        with pytest.raises(TypeError, match="retry_on"):
            with_retry(FlakyClient(0), retry_on=(int,))
        with pytest.raises(TypeError, match="call"):
            with_retry(object())


# -- the same over real TCP sockets on 127.0.0.1 ---------------------------------

needs_tcp = pytest.mark.skipif(not hasattr(ef, "TCPServerTransport"),
                               reason="the TCP transports are not merged yet")


@pytest.fixture
def tcp_pair():
    """A server-side queue and a factory of connected client queues."""
    server_transport = ef.TCPServerTransport("127.0.0.1", 0)
    server_transport.start()
    server_queue = MessageQueue(server_transport)
    clients = []

    def client_queue():
        transport = ef.TCPClientTransport("127.0.0.1", server_transport.address[1])
        transport.connect(timeout=10)
        queue = MessageQueue(transport)
        clients.append(queue)
        return queue

    yield server_queue, client_queue
    for queue in clients:
        queue.close()
    server_queue.close()


@needs_tcp
class TestOverTCP:
    def test_calls_errors_and_not_found(self, tcp_pair):
        server_queue, client_queue = tcp_pair
        with RPCServer(server_queue, service_name="calc") as server:
            server.add_method("add", add)
            server.add_method("boom", boom)
            server.add_method("unjsonable", lambda: object())
            client = RPCClient(client_queue(), service_name="calc", timeout=10)
            assert client.add(1, 2) == 3
            assert client.add([1], [2]) == [1, 2]
            assert client.call("add", a="x", b="y") == "xy"
            with pytest.raises(ef.RemoteError) as info:
                client.boom("over tcp")
            assert str(info.value) == "ValueError: over tcp"
            assert "in boom" in info.value.remote_traceback
            with pytest.raises(ef.MethodNotFoundError, match="Method not found: nope"):
                client.nope()
            with pytest.raises(ef.RemoteError) as info:
                client.unjsonable()
            assert info.value.remote_type == "SerializationError"
            with pytest.raises(ef.SerializationError):
                client.add(object(), 1)  # refused before a byte is sent

    def test_replies_reach_only_their_caller(self, tcp_pair):
        server_queue, client_queue = tcp_pair
        with Executor(ExecutionMode.THREAD, max_workers=4) as executor:
            with RPCServer(server_queue, executor=executor) as server:
                server.add_method("add", add)
                clients = [RPCClient(client_queue(), timeout=20) for _ in range(3)]
                errors = []

                def run(n, client):
                    for i in range(100):
                        if client.add(n * 1000, i) != n * 1000 + i:
                            errors.append((n, i))

                threads = [threading.Thread(target=run, args=(n, c))
                           for n, c in enumerate(clients)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(60)
                assert not errors and server.stats["succeeded"] == 300

    def test_timeout_and_late_reply(self, tcp_pair):
        server_queue, client_queue = tcp_pair
        gate = threading.Event()
        with Executor(ExecutionMode.THREAD, max_workers=2) as executor:
            with RPCServer(server_queue, executor=executor) as server:
                server.add_method("wait", lambda: gate.wait(10))
                server.add_method("add", add)
                client = RPCClient(client_queue(), timeout=10)
                start = time.monotonic()
                with pytest.raises(ef.RPCTimeoutError):
                    client.call("wait", timeout=0.2)
                assert 0.2 <= time.monotonic() - start < 0.2 + SLACK
                gate.set()
                deadline = time.monotonic() + 5
                while server.stats["in_flight"] and time.monotonic() < deadline:
                    time.sleep(0.01)
                assert client.add(1, 1) == 2  # the late reply did not get in the way

    @pytest.mark.parametrize("dispatch", ["inline", "leader", "thread"])
    def test_without_an_executor_a_method_runs_where_the_request_was_read(
            self, dispatch, monkeypatch):
        """End to end over TCP: with no executor, "inline" and "leader" run the
        method on the very thread that read the request off the socket (no
        hand-off); "thread" hands every callback to its one dispatcher thread."""
        import socket

        readers = []  # ident of the server-side thread that read each request
        port = []
        real_recv, real_recv_into = socket.socket.recv, socket.socket.recv_into

        def note(sock, data):
            if b"calc.request" in data and port and sock.getsockname()[1] == port[0]:
                readers.append(threading.get_ident())

        def recv(sock, *args, **kwargs):
            data = real_recv(sock, *args, **kwargs)
            note(sock, data)
            return data

        def recv_into(sock, buffer, *args, **kwargs):
            n = real_recv_into(sock, buffer, *args, **kwargs)
            note(sock, bytes(memoryview(buffer)[:n]))
            return n

        monkeypatch.setattr(socket.socket, "recv", recv)
        monkeypatch.setattr(socket.socket, "recv_into", recv_into)
        server_transport = ef.TCPServerTransport("127.0.0.1", 0, dispatch=dispatch)
        server_transport.start()
        port.append(server_transport.address[1])
        ran_on = []

        def where(i):
            ran_on.append((threading.get_ident(), threading.current_thread().name))
            return i

        client_transport = ef.TCPClientTransport("127.0.0.1", port[0])
        try:
            with RPCServer(MessageQueue(server_transport), service_name="calc") as server:
                server.add_method("where", where)
                client_transport.connect(timeout=10)
                client = RPCClient(MessageQueue(client_transport), service_name="calc",
                                   timeout=10)
                assert [client.where(i) for i in range(20)] == list(range(20))
        finally:
            client_transport.close()
            server_transport.close()
        assert len(readers) == len(ran_on) == 20
        idents = [ident for ident, _ in ran_on]
        names = {name for _, name in ran_on}
        if dispatch == "thread":  # documented: one hop to the dispatcher thread
            assert not set(idents) & set(readers)
            assert names == {"eventforge-tcp-server-dispatch"}
        else:
            assert idents == readers  # each call ran on the thread that read it
            assert all(name.startswith(f"eventforge-tcp-server-io-{port[0]}")
                       for name in names)
            if dispatch == "inline":  # the one loop thread, no standby
                assert names == {f"eventforge-tcp-server-io-{port[0]}"}

    def test_call_async_over_tcp(self, tcp_pair):
        server_queue, client_queue = tcp_pair
        with RPCServer(server_queue) as server:
            server.add_method("add", add)
            client = RPCClient(client_queue(), timeout=10)

            async def go():
                return await asyncio.gather(*(client.call_async("add", i, 1) for i in range(10)))

            assert asyncio.run(go()) == [i + 1 for i in range(10)]

    def test_client_side_server(self, tcp_pair):
        """The server may equally sit on a client connection (server-side caller)."""
        server_queue, client_queue = tcp_pair
        with RPCServer(client_queue(), service_name="edge") as server:
            server.add_method("add", add)
            caller = RPCClient(client_queue(), service_name="edge", timeout=10)
            deadline = time.monotonic() + 10
            while True:  # interest travels to the hub asynchronously
                try:
                    assert caller.call("add", 2, 2, timeout=0.5) == 4
                    break
                except ef.RPCTimeoutError:
                    assert time.monotonic() < deadline
