"""Issue 7, core side: errors nobody handles are visible, BaseException from
user code fails only that call, RPC always answers, requests carry a TTL."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from _core_helpers import PATIENCE, wait_until

import eventforge as ef

BASE_EXCEPTIONS = [SystemExit(3), KeyboardInterrupt(), asyncio.CancelledError(), GeneratorExit()]


def _in_thread(func):
    """Run ``func`` on a fresh (non-main) thread; return its result, re-raise its error."""
    out = {}

    def run():
        try:
            out["value"] = func()
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            out["error"] = exc

    thread = threading.Thread(target=run, name="test-publisher")
    thread.start()
    thread.join(PATIENCE)
    assert not thread.is_alive()
    if "error" in out:
        raise out["error"]
    return out.get("value")


# -- 2. handler errors nobody handles are visible --------------------------------------------


def _run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, timeout=60,
    )


def test_an_unhandled_subscriber_error_prints_one_traceback_to_stderr():
    done = _run_python("""
        import eventforge as ef
        queue = ef.MessageQueue()
        queue.subscribe("t", lambda m: 1 / 0)
        queue.publish("t", 1)
        print("publish returned")
        transport = ef.MemoryTransport()
        def bad(message):
            raise ValueError("boom")
        transport.subscribe("u", bad)
        transport.send(ef.Message("u", 2))
    """)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "publish returned\n"
    assert done.stderr.count("Traceback (most recent call last)") == 2
    assert done.stderr.count("ZeroDivisionError") == 1
    assert done.stderr.count("ValueError: boom") == 1
    assert "eventforge: handler" in done.stderr and "on 't'" in done.stderr
    assert "eventforge: subscriber bad on 'u'" in done.stderr


def test_on_error_takes_the_error_over():
    done = _run_python("""
        import eventforge as ef
        seen = []
        queue = ef.MessageQueue(on_error=lambda exc, m: seen.append(type(exc).__name__))
        queue.subscribe("t", lambda m: 1 / 0)
        queue.publish("t", 1)
        print(seen)
    """)
    assert done.returncode == 0 and done.stdout == "['ZeroDivisionError']\n"
    assert done.stderr == ""


def test_app_logging_config_takes_the_error_over():
    done = _run_python("""
        import logging, sys
        import eventforge as ef
        logging.basicConfig(stream=sys.stdout, format="LOG %(name)s %(levelname)s %(message)s")
        queue = ef.MessageQueue()
        queue.subscribe("t", lambda m: 1 / 0)
        queue.publish("t", 1)
    """)
    assert done.returncode == 0 and done.stderr == ""
    assert done.stdout.startswith("LOG eventforge ERROR handler")
    assert done.stdout.count("Traceback (most recent call last)") == 1


def test_a_handler_on_the_eventforge_logger_also_counts_as_configured():
    done = _run_python("""
        import logging, sys
        import eventforge as ef
        logging.getLogger("eventforge").addHandler(logging.StreamHandler(sys.stdout))
        ef.MessageQueue().subscribe("t", lambda m: 1 / 0)
        q = ef.MessageQueue(); q.subscribe("t", lambda m: 1 / 0); q.publish("t")
    """)
    assert done.returncode == 0 and done.stderr == ""
    assert done.stdout.count("ZeroDivisionError") == 1


def test_a_failing_on_error_hook_is_shown_with_the_original_error():
    done = _run_python("""
        import eventforge as ef
        def hook(exc, message):
            raise RuntimeError("hook broke")
        queue = ef.MessageQueue(on_error=hook)
        queue.subscribe("t", lambda m: 1 / 0)
        queue.publish("t", 1)
        print(queue.stats["handler_errors"])
    """)
    assert done.returncode == 0 and done.stdout == "1\n"
    assert "on_error hook failed" in done.stderr
    assert "RuntimeError: hook broke" in done.stderr and "ZeroDivisionError" in done.stderr


# -- 3. BaseException from user code fails that call only ------------------------------------


@pytest.mark.parametrize("error", BASE_EXCEPTIONS, ids=lambda e: type(e).__name__)
def test_memory_transport_delivery_survives_base_exceptions(error, caplog):
    transport = ef.MemoryTransport()
    got = []

    def bad(message):
        raise error

    transport.subscribe("t", bad)
    transport.subscribe("t", got.append)
    _in_thread(lambda: transport.send(ef.Message("t", 1)))
    _in_thread(lambda: transport.send(ef.Message("t", 2)))
    assert [m.payload for m in got] == [1, 2]
    assert transport.stats["handler_errors"] == 2
    transport.close()


@pytest.mark.parametrize("error", BASE_EXCEPTIONS, ids=lambda e: type(e).__name__)
def test_message_queue_handlers_survive_base_exceptions(error):
    seen = []
    queue = ef.MessageQueue(on_error=lambda exc, m: seen.append(type(exc)))
    got = []

    def bad(message):
        raise error

    queue.subscribe("t", bad)
    queue.subscribe("t", got.append)
    for n in range(3):
        _in_thread(lambda n=n: queue.publish("t", n))
    assert len(got) == 3 and seen == [type(error)] * 3
    assert queue.stats["handler_errors"] == 3
    queue.close()


def test_ctrl_c_on_the_main_thread_still_stops_the_publisher():
    transport = ef.MemoryTransport()

    def interrupted(message):
        raise KeyboardInterrupt

    transport.subscribe("t", interrupted)
    with pytest.raises(KeyboardInterrupt):
        transport.send(ef.Message("t", 1))
    transport.close()


@pytest.mark.parametrize("error", BASE_EXCEPTIONS, ids=lambda e: type(e).__name__)
def test_executor_sequential_and_thread_modes_survive_base_exceptions(error):
    def task():
        raise error

    with ef.Executor(ef.ExecutionMode.SEQUENTIAL) as sequential:
        task_id = _in_thread(lambda: sequential.submit(task))
        result = sequential.result(task_id, timeout=PATIENCE)
        assert result.status is ef.TaskStatus.FAILED
        assert result.error_type == type(error).__name__
        assert sequential.result(sequential.submit(lambda: 5)).value == 5
    with ef.Executor(ef.ExecutionMode.THREAD, max_workers=1) as threaded:
        result = threaded.result(threaded.submit(task), timeout=PATIENCE)
        assert result.status is ef.TaskStatus.FAILED
        assert result.error_type == type(error).__name__
        assert threaded.result(threaded.submit(lambda: 6), timeout=PATIENCE).value == 6


@pytest.mark.parametrize("error", BASE_EXCEPTIONS, ids=lambda e: type(e).__name__)
def test_rpc_method_raising_a_base_exception_gives_a_remote_error(error):
    queue = ef.MessageQueue()
    server = ef.RPCServer(queue)

    @server.register
    def explode():
        raise error

    @server.register
    def ok():
        return "fine"

    server.serve(blocking=False)
    client = ef.RPCClient(queue, timeout=PATIENCE)
    for _ in range(2):
        with pytest.raises(ef.RemoteError) as caught:
            _in_thread(client.explode)
        assert caught.value.remote_type == type(error).__name__
    assert _in_thread(client.ok) == "fine"
    assert server.stats["failed"] == 2 and server.stats["in_flight"] == 0
    server.stop()
    queue.close()


def test_rpc_over_tcp_survives_a_method_raising_keyboard_interrupt(tcp):
    server_transport = tcp.server()
    queue = ef.MessageQueue(transport=server_transport)
    server = ef.RPCServer(queue)
    server.add_method("explode", lambda: (_ for _ in ()).throw(KeyboardInterrupt()))
    server.add_method("ok", lambda: "fine")
    server.serve(blocking=False)
    client = ef.RPCClient(ef.MessageQueue(transport=tcp.client(server_transport.port)),
                          timeout=PATIENCE)
    for _ in range(2):
        with pytest.raises(ef.RemoteError, match="KeyboardInterrupt"):
            client.explode()
    assert client.ok() == "fine"
    server.stop()


# -- 5. RPC keeps its promises --------------------------------------------------------------


class _UnprintableError(Exception):
    def __str__(self):
        raise RuntimeError("no text for you")


def test_an_exception_whose_str_raises_still_gives_a_remote_error():
    queue = ef.MessageQueue()
    server = ef.RPCServer(queue)

    @server.register
    def weird():
        raise _UnprintableError()

    server.serve(blocking=False)
    client = ef.RPCClient(queue, timeout=PATIENCE)
    with pytest.raises(ef.RemoteError) as caught:
        client.weird()
    assert caught.value.remote_type == "_UnprintableError"
    assert "str() of the _UnprintableError failed" in caught.value.remote_message
    server.stop()
    queue.close()


def test_a_reply_too_large_for_a_frame_is_a_remote_error_at_once(tcp):
    server_transport = tcp.server(max_frame_size=4096)
    queue = ef.MessageQueue(transport=server_transport)
    server = ef.RPCServer(queue)
    calls = []

    @server.register
    def big():
        calls.append(1)
        return "x" * 10_000

    server.serve(blocking=False)
    client = ef.MessageQueue(transport=tcp.client(server_transport.port))
    retrying = ef.with_retry(ef.RPCClient(client, timeout=60.0), max_retries=3)
    with pytest.raises(ef.RemoteError) as caught:
        retrying.big()  # not an RPCTimeoutError after 60 s, not retried
    assert caught.value.remote_type == "FrameTooLargeError"
    assert "max_frame_size is 4096" in caught.value.remote_message
    assert "big()" in caught.value.remote_message
    assert calls == [1]
    assert server.stats["reply_errors"] == 1
    server.stop()


def test_stop_answers_a_call_in_flight_on_memory_transport():
    queue = ef.MessageQueue()
    server = ef.RPCServer(queue)
    release = threading.Event()
    started = threading.Event()

    @server.register
    def slow():
        started.set()
        release.wait(PATIENCE)
        return "done"

    server.serve(blocking=False)
    client = ef.RPCClient(queue, timeout=PATIENCE)
    result = {}
    caller = threading.Thread(target=lambda: result.update(value=client.slow()))
    caller.start()
    assert started.wait(PATIENCE)
    stopper = threading.Thread(target=server.stop)
    stopper.start()
    assert wait_until(lambda: not server.serving)
    release.set()
    caller.join(PATIENCE)
    stopper.join(PATIENCE)
    assert result == {"value": "done"}
    queue.close()


def test_stop_answers_every_request_queued_on_one_tcp_connection(tcp):
    server_transport = tcp.server()
    queue = ef.MessageQueue(transport=server_transport)
    server = ef.RPCServer(queue)
    release = threading.Event()

    @server.register
    def slow(n):
        release.wait(PATIENCE)
        return n * 10

    server.serve(blocking=False)
    client = ef.RPCClient(ef.MessageQueue(transport=tcp.client(server_transport.port)),
                          timeout=PATIENCE * 3)
    results = {}
    callers = [threading.Thread(target=lambda n=n: results.update({n: client.slow(n)}))
               for n in range(3)]
    for caller in callers:
        caller.start()
    # All three were read by the server; the first one runs, two wait behind it.
    assert wait_until(lambda: server_transport.stats["messages_in"] == 3
                      and server.stats["in_flight"] == 1)
    stopper = threading.Thread(target=server.stop)
    stopper.start()
    assert wait_until(lambda: not server.serving)
    release.set()
    for caller in callers:
        caller.join(PATIENCE * 3)
    stopper.join(PATIENCE)
    assert results == {0: 0, 1: 10, 2: 20}
    assert server.stats["succeeded"] == 3


# -- 8. requests carry their TTL -------------------------------------------------------------


def test_requests_carry_the_ttl_header():
    queue = ef.MessageQueue()
    seen = []

    def responder(message):
        seen.append(message.headers.get(ef.TTL_HEADER, "absent"))
        queue.reply(message, "ok")

    queue.subscribe("svc", responder)
    queue.subscribe("rpc.request", lambda m: seen.append(m.headers.get("_ttl_ms", "absent")))
    assert queue.request("svc", 1, timeout=2.5).payload == "ok"
    assert queue.request("svc", 1, timeout=None).payload == "ok"
    with pytest.raises(ef.RPCTimeoutError):
        ef.RPCClient(queue, timeout=0.25).call("anything")
    with pytest.raises(ef.RPCTimeoutError):
        ef.RPCClient(queue).call("anything", timeout=0.5)
    assert seen == [2500, "absent", 250, 500]
    queue.close()


async def _request_async(queue):
    return await queue.request_async("svc", 1, timeout=1.5)


def test_async_requests_carry_the_ttl_header_too():
    queue = ef.MessageQueue()
    seen = []
    queue.subscribe("svc", lambda m: (seen.append(m.headers["_ttl_ms"]), queue.reply(m, 1)))
    assert asyncio.run(_request_async(queue)).payload == 1
    assert seen == [1500]
    queue.close()


def test_a_user_header_named_like_the_ttl_is_replaced_by_the_real_ttl():
    queue = ef.MessageQueue()
    seen = []
    queue.subscribe("svc", lambda m: (seen.append(m.headers["_ttl_ms"]), queue.reply(m, 1)))
    start = time.monotonic()
    queue.request("svc", 1, timeout=3, _ttl_ms=99)
    assert seen == [3000] and time.monotonic() - start < PATIENCE
    queue.close()
