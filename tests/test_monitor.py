"""The monitor (issue 13): endpoints, metrics formats, the page, security defaults.

Everything runs over real sockets on 127.0.0.1: a TCP server with clients,
an RPC server on a thread executor, and ``Monitor(port=0)`` watching them.
The metrics are checked with prometheus_client's parsers and, when it is
installed, ``promtool check metrics``; the page is loaded in headless
Chromium when it is installed (both are required in CI, see .ci/run).
"""

from __future__ import annotations

import base64
import http.client
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

import pytest
from _core_helpers import wait_for as _wait_for
from _worker_helpers import Worker
from hypothesis import given, settings
from hypothesis import strategies as st

import eventforge as ef

ENDPOINTS = ("/", "/healthz", "/varz", "/connz", "/subsz", "/rpcz", "/queuez", "/meterz",
             "/metrics")
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}
HOSTILE = "x.<script>alert(1)</script>"  # a valid topic: no whitespace, no wildcard
IN_CI = bool(os.environ.get("CI") or os.environ.get("EVENTFORGE_CI"))
ARTIFACTS = os.path.join(os.path.dirname(__file__), "artifacts")


def fetch(port: int, path: str, *, method: str = "GET", headers: Optional[Dict[str, str]] = None,
          host: Optional[str] = None) -> Tuple[int, Any, bytes]:
    """One HTTP request; returns (status, headers, body) whatever the status."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest(method, path, skip_host=True)
        conn.putheader("Host", host if host is not None else f"127.0.0.1:{port}")
        for key, value in (headers or {}).items():
            conn.putheader(key, value)
        conn.endheaders()
        response = conn.getresponse()
        return response.status, response.headers, response.read()
    finally:
        conn.close()


def get_json(port: int, path: str, **kw: Any) -> Tuple[int, Any]:
    status, headers, body = fetch(port, path, **kw)
    assert headers["Content-Type"] == "application/json", (path, headers["Content-Type"])
    return status, json.loads(body)


def wait_for(predicate: Any, timeout: float = 30.0, what: str = "condition") -> Any:
    return _wait_for(predicate, timeout, what)  # a monitor scrape can be slow: 30 s


class FakeWorkQueue:
    """A component speaking the queue snapshot protocol (monitor_snapshot())."""

    def __init__(self, queues: Dict[str, Dict[str, Any]]) -> None:
        self.queues = queues

    def monitor_snapshot(self) -> Dict[str, Dict[str, Any]]:
        return {name: dict(counters) for name, counters in self.queues.items()}


def wait_hist(counts: List[int]) -> Dict[str, Any]:
    buckets, running = [], 0
    for bound, n in zip(list(ef.DURATION_BUCKETS) + ["+Inf"], counts):
        running += n
        buckets.append([bound, running])
    return {"buckets": buckets, "sum": 1.5, "count": running}


class Meterish:
    name = "timing"

    def __init__(self) -> None:
        self.stats = {"count": 2, "avg": 0.25, "max": 0.5, "label": "not a number"}


class Stack:
    """A TCP server with an RPC service, clients, a queue and a meter, all monitored."""

    def __init__(self, tcp: Any, **monitor_options: Any) -> None:
        self.server = tcp.server()
        self.queue = ef.MessageQueue(self.server)
        self.executor = ef.Executor("thread", max_workers=3)
        self.rpc = ef.RPCServer(self.queue, executor=self.executor, service_name="math")
        self.release = threading.Event()
        self.rpc.add_method("add", lambda a, b: a + b)
        self.rpc.add_method("never_called", lambda: None)
        self.rpc.add_method("fail", self._fail)
        self.rpc.add_method("block", lambda: self.release.wait(30))
        self.rpc.serve(blocking=False)
        self.work = FakeWorkQueue({
            "jobs.email": {"ready": 3, "in_flight": 1, "delayed": 0, "dead_letters": 2,
                           "oldest_ready_age_seconds": 4.5, "acked_total": 10,
                           "nacked_total": 2, "redelivered_total": 1, "dead_lettered_total": 2,
                           "wait_seconds": wait_hist([1, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                                      0, 0, 1])},
            "jobs.sms": {"ready": 0, "in_flight": 0, "delayed": 1, "dead_letters": 0,
                         "oldest_ready_age_seconds": 0, "acked_total": 5, "nacked_total": 0,
                         "redelivered_total": 0, "dead_lettered_total": 0},
        })
        monitor_options.setdefault("port", 0)
        self.monitor = tcp.own(ef.Monitor(components=[self.rpc], **monitor_options))
        self.monitor.watch(self.work, "work")
        self.monitor.watch(Meterish())
        self.monitor.start()
        self.port = self.monitor.port
        tcp.own(self.queue)
        self.client = tcp.client(self.server.port, name="client-one")
        self.client_queue = ef.MessageQueue(self.client)
        self.caller = ef.RPCClient(self.client_queue, "math")

    @staticmethod
    def _fail(kind: str) -> None:
        raise {"value": ValueError, "key": KeyError}[kind]("boom")

    def close(self) -> None:
        self.release.set()
        self.rpc.stop(5)
        self.executor.stop()


@pytest.fixture
def stack(tcp):
    made = Stack(tcp)
    yield made
    made.close()


# -- endpoints -----------------------------------------------------------------


def test_every_endpoint_answers_get_and_head_with_the_security_headers(stack):
    for path in ENDPOINTS:
        status, headers, body = fetch(stack.port, path)
        assert status == 200, (path, body[:200])
        for key, value in SECURITY_HEADERS.items():
            assert headers[key] == value, (path, key)
        assert int(headers["Content-Length"]) == len(body) > 0
        head_status, head_headers, head_body = fetch(stack.port, path, method="HEAD")
        assert head_status == 200 and head_body == b""
        assert head_headers["Content-Type"] == headers["Content-Type"]
    assert fetch(stack.port, "/")[1]["Content-Type"] == "text/html; charset=utf-8"


def test_read_only_other_methods_are_refused(stack):
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        status, headers, body = fetch(stack.port, "/varz", method=method)
        assert status == 405 and headers["Allow"] == "GET, HEAD"
        assert headers["X-Content-Type-Options"] == "nosniff"
    assert fetch(stack.port, "/nope")[0] == 404


def test_healthz_turns_503_with_the_reason(stack):
    assert get_json(stack.port, "/healthz") == (200, {"status": "ok"})
    stack.monitor.add_check("disk", lambda: "disk almost full")
    status, body = get_json(stack.port, "/healthz")
    assert status == 503 and body["status"] == "unavailable"
    assert "disk almost full" in body["reason"]
    stack.monitor.add_check("disk", lambda: None)
    assert get_json(stack.port, "/healthz")[0] == 200
    stack.rpc.stop(5)
    status, body = get_json(stack.port, "/healthz")
    assert status == 503 and "RPC server math is not serving" in body["reason"]


def test_varz_has_identity_totals_drops_and_process_figures(stack):
    assert stack.caller.call("add", 2, 3) == 5
    status, varz = get_json(stack.port, "/varz")
    assert status == 200
    for key in ("server_id", "version", "start", "now", "uptime_seconds", "connections",
                "total_connections", "subscriptions", "in_msgs", "out_msgs", "in_bytes",
                "out_bytes", "slow_consumers", "dropped", "rss_bytes", "cpu_seconds"):
        assert key in varz, key
    assert varz["version"] == ef.__version__
    assert varz["connections"] == 1 and varz["total_connections"] == 1
    assert varz["in_msgs"] >= 1 and varz["out_msgs"] >= 1
    assert varz["in_bytes"] > 0 and varz["out_bytes"] > 0
    assert varz["dropped"]["slow_consumers"] == 0 and "mailbox_full" in varz["dropped"]
    assert varz["cpu_seconds"] > 0
    if sys.platform.startswith("linux"):
        assert varz["rss_bytes"] > 1_000_000


def test_connz_pages_sorts_and_remembers_closed_connections(stack, tcp):
    extra = [tcp.client(stack.server.port, name=f"extra-{n}") for n in range(3)]
    wait_for(lambda: len(stack.server.connections()) == 4, what="4 connections")
    status, body = get_json(stack.port, "/connz?limit=2&sort=cid")
    assert status == 200 and body["total"] == 4 and len(body["connections"]) == 2
    cids = [c["cid"] for c in body["connections"]]
    assert cids == sorted(cids)
    rest = get_json(stack.port, "/connz?limit=2&offset=2")[1]["connections"]
    assert len(rest) == 2 and not set(cids) & {c["cid"] for c in rest}
    one = body["connections"][0]
    for key in ("cid", "peer", "name", "start", "last_activity", "pending_bytes", "in_msgs",
                "in_bytes", "out_frames", "out_bytes", "subscriptions", "idle_seconds"):
        assert key in one, key
    names = {c["name"] for c in get_json(stack.port, "/connz")[1]["connections"]}
    assert names == {"client-one", "extra-0", "extra-1", "extra-2"}
    for sort in ("pending", "last", "idle", "msgs_from", "msgs_to", "bytes_from",
                 "bytes_to", "subs", "start"):
        assert get_json(stack.port, f"/connz?sort={sort}")[1]["total"] == 4

    extra[0].close()
    closed = wait_for(lambda: get_json(stack.port, "/connz?state=closed")[1]["connections"],
                        what="the closed connection")
    assert closed[0]["name"] == "extra-0" and closed[0]["state"] == "closed"
    assert closed[0]["reason"] and closed[0]["stop"]
    assert get_json(stack.port, "/connz?state=any")[1]["total"] == 4


@pytest.mark.parametrize("query", [
    "sort=bogus", "state=half", "limit=abc", "limit=0", "offset=-1", "limit=1&limit=2",
    "unknown=1", "limit", "%zz=1", "limit=" + "9" * 40,
])
def test_a_bad_query_gets_a_400(stack, query):
    status, body = get_json(stack.port, "/connz?" + query)
    assert status == 400 and body["error"]


def test_params_where_none_are_taken_and_bad_test_topics_are_400(stack):
    assert get_json(stack.port, "/varz?x=1")[0] == 400
    assert get_json(stack.port, "/subsz?test=a..b")[0] == 400
    assert get_json(stack.port, "/subsz?test=a.*")[0] == 400


def test_a_huge_limit_is_capped(stack):
    status, body = get_json(stack.port, "/connz?limit=1000000000000&offset=99999999999999")
    assert status == 200 and body["limit"] == 1000 and body["offset"] == 10 ** 9
    assert body["connections"] == []
    assert get_json(stack.port, "/subsz?limit=5000")[1]["limit"] == 1000


def test_subsz_counts_patterns_and_tests_a_topic(stack):
    stack.client_queue.subscribe("orders.*", lambda m: None)
    stack.client_queue.subscribe("orders.*", lambda m: None)
    stack.queue.subscribe("billing.**", lambda m: None)
    inbox = stack.client.open_inbox("_reply.private-id-123")
    try:
        def patterns() -> Dict[str, Any]:
            rows = get_json(stack.port, "/subsz")[1]["patterns"]
            return {r["pattern"]: r for r in rows}

        rows = wait_for(lambda: (lambda p: p if "orders.*" in p and "_reply.*" in p else None)(
            patterns()), what="remote interest")
        assert rows["orders.*"]["remote"] == 1  # one interest per connection and pattern
        assert rows["billing.**"]["local"] == 1 and rows["math.request"]["local"] == 1
        _, body = get_json(stack.port, "/subsz")
        assert "private-id-123" not in json.dumps(body)  # inboxes fold into one label
        _, tested = get_json(stack.port, "/subsz?test=orders.created")
        assert [r["pattern"] for r in tested["patterns"]] == ["orders.*"]
        _, tested = get_json(stack.port, "/subsz?test=billing.x.y")
        assert [r["pattern"] for r in tested["patterns"]] == ["billing.**"]
    finally:
        inbox.close()


def test_rpcz_per_method_calls_errors_in_flight_and_latency(stack):
    for n in range(5):
        assert stack.caller.call("add", n, 1) == n + 1
    for kind in ("value", "value", "key"):
        with pytest.raises(ef.RemoteError):
            stack.caller.call("fail", kind)
    blocked = threading.Thread(target=lambda: stack.caller.call("block", timeout=30),
                               name="test-blocked-call")
    blocked.start()
    try:
        service = wait_for(
            lambda: (lambda s: s if s["methods"]["block"]["in_flight"] == 1 else None)(
                get_json(stack.port, "/rpcz")[1]["services"]["math"]), what="a call in flight")
        add = service["methods"]["add"]
        assert add["calls"] == 5 and add["error_total"] == 0
        assert add["p50_seconds"] is not None and add["p99_seconds"] >= add["p50_seconds"]
        fail = service["methods"]["fail"]
        assert fail["errors"] == {"ValueError": 2, "KeyError": 1} and fail["error_total"] == 3
        assert service["methods"]["never_called"]["calls"] == 0
        assert service["workers"] == {"total": 3, "busy": 1, "mode": "thread"}
        assert service["in_flight"] == 1
    finally:
        stack.release.set()
        blocked.join(10)
    assert not blocked.is_alive()


def test_queuez_and_meterz(stack):
    _, body = get_json(stack.port, "/queuez")
    email = body["queues"]["jobs.email"]
    assert email["ready"] == 3 and email["dead_letters"] == 2 and email["acked_total"] == 10
    assert email["oldest_ready_age_seconds"] == 4.5
    _, body = get_json(stack.port, "/queuez?limit=1&offset=1")
    assert list(body["queues"]) == ["jobs.sms"] and body["total"] == 2
    _, body = get_json(stack.port, "/meterz")
    assert body["meters"]["timing"]["count"] == 2


def test_no_payload_argument_or_secret_is_ever_shown(tcp):
    made = Stack(tcp, token="tok-XYZ-secret")
    try:
        made.client_queue.subscribe("secret.topic", lambda m: None)
        made.queue.publish("secret.topic", {"card": "payload-S3CRET"})
        made.caller.call("add", "arg-S3CRET-", "x")
        bodies = [fetch(made.port, path, headers={"Authorization": "Bearer tok-XYZ-secret"})[2]
                  for path in ENDPOINTS + ("/connz?state=any",)]
        text = b"".join(bodies)
        assert b"S3CRET" not in text and b"tok-XYZ" not in text
    finally:
        made.close()


# -- metrics ---------------------------------------------------------------------


def om_samples(text: str) -> List[Tuple[str, Tuple[Tuple[str, str], ...], float]]:
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    return [(s.name, tuple(sorted(s.labels.items())), s.value)
            for family in text_string_to_metric_families(text) for s in family.samples]


def prom_samples(text: str) -> List[Tuple[str, Tuple[Tuple[str, str], ...], float]]:
    from prometheus_client.parser import text_string_to_metric_families

    return [(s.name, tuple(sorted(s.labels.items())), s.value)
            for family in text_string_to_metric_families(text) for s in family.samples]


def check_histograms(samples: List[Tuple[str, Tuple[Tuple[str, str], ...], float]]) -> int:
    """Ascending le, cumulative counts, +Inf == _count; returns how many histograms."""
    buckets: Dict[Tuple[str, Tuple[Any, ...]], List[Tuple[float, float]]] = {}
    counts: Dict[Tuple[str, Tuple[Any, ...]], float] = {}
    for name, labels, value in samples:
        if name.endswith("_bucket"):
            rest = tuple(kv for kv in labels if kv[0] != "le")
            le = dict(labels)["le"]
            buckets.setdefault((name[:-7], rest), []).append((float(le), value))
        elif name.endswith("_count"):
            counts[(name[:-6], labels)] = value
    for key, series in buckets.items():
        les = [le for le, _ in series]
        assert les == sorted(les) and len(set(les)) == len(les), key
        assert math.isinf(les[-1]), key
        values = [v for _, v in series]
        assert values == sorted(values), key  # cumulative
        assert values[-1] == counts[key], key
    return len(buckets)


def test_metrics_parse_as_openmetrics_and_as_prometheus_text(stack):
    stack.caller.call("add", 1, 2)
    with pytest.raises(ef.RemoteError):
        stack.caller.call("fail", "value")
    status, headers, body = fetch(
        stack.port, "/metrics",
        headers={"Accept": "application/openmetrics-text;version=1.0.0,text/plain;q=0.5"})
    assert status == 200
    assert headers["Content-Type"] == "application/openmetrics-text; version=1.0.0; charset=utf-8"
    om_text = body.decode()
    assert om_text.endswith("# EOF\n")
    status, headers, body = fetch(stack.port, "/metrics")
    assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    text = body.decode()
    assert text.endswith("\n") and not text.endswith("\n\n")

    om = om_samples(om_text)
    prom = prom_samples(text)
    for samples in (om, prom):
        series = [(name, labels) for name, labels, _ in samples]
        assert len(series) == len(set(series)), "duplicate series"
        assert check_histograms(samples) >= 4 + 1  # rpc methods + queue wait
    # Same series in both formats; values too, except those that moved between
    # the two scrapes (a reply inbox's interest may be withdrawn meanwhile).
    # (the server counts a call out of flight just after its reply left, too).
    moving = ("process_", "eventforge_in_bytes", "eventforge_out_bytes",
              "eventforge_messages_", "eventforge_rpc_", "eventforge_subscriptions")
    assert ({s[:2] for s in om if not s[0].startswith(moving[-1])}
            == {s[:2] for s in prom if not s[0].startswith(moving[-1])})
    assert ({s for s in om if not s[0].startswith(moving)}
            == {s for s in prom if not s[0].startswith(moving)})
    # From one snapshot the two formats carry exactly the same samples.
    snap = stack.monitor.snapshot()
    one = ef._render_metrics(snap, True, 100)
    two = ef._render_metrics(snap, False, 100)
    assert sorted(om_samples(one)) == sorted(prom_samples(two))

    values = {(name, labels): value for name, labels, value in om}
    math_add = (("method", "add"), ("service", "math"))
    assert values[("eventforge_rpc_calls_total", math_add)] == 1
    never = (("method", "never_called"), ("service", "math"))
    assert values[("eventforge_rpc_calls_total", never)] == 0  # pre-exported zero
    assert values[("eventforge_rpc_call_failures_total", never)] == 0
    fail = (("method", "fail"), ("service", "math"))
    kind = tuple(sorted(fail + (("kind", "ValueError"),)))
    assert values[("eventforge_rpc_call_errors_total", kind)] == 1
    assert values[("eventforge_connection_failures_total", (("reason", "slow_consumers"),))] == 0
    assert values[("eventforge_queue_dead_letters", (("queue", "jobs.email"),))] == 2
    assert values[("eventforge_queue_wait_seconds_count", (("queue", "jobs.email"),))] == 4
    assert values[("eventforge_build_info", (("python", sys.version.split()[0]),
                                             ("version", ef.__version__)))] == 1
    assert values[("eventforge_healthy", ())] == 1
    assert values[("process_cpu_seconds_total", ())] > 0
    assert values[("eventforge_meter", (("meter", "timing"), ("stat", "avg")))] == 0.25
    for name, _, _ in om:  # base units and the prefix
        assert name.startswith(("eventforge_", "process_")), name
        assert not re.search(r"_(ms|milliseconds|kb|mb|percent)(_|$)", name), name


def test_label_values_are_capped_with_the_overflow_counted(tcp):
    server = tcp.server()
    queue = tcp.own(ef.MessageQueue(server))
    for n in range(10):
        queue.subscribe(f"area{n}.*", lambda m: None)
    monitor = tcp.own(ef.Monitor(port=0, components=[queue], max_label_values=4))
    samples = om_samples(monitor.metrics(openmetrics=True))
    patterns = {dict(labels)["pattern"] for name, labels, _ in samples
                if name == "eventforge_subscriptions"}
    assert len(patterns) == 4 and "__other__" in patterns
    other = [v for name, labels, v in samples if name == "eventforge_subscriptions"
             and dict(labels) == {"pattern": "__other__", "side": "local"}]
    assert other == [7]
    folded = {dict(labels)["family"]: v for name, labels, v in samples
              if name == "eventforge_monitor_folded_label_values"}
    assert folded["eventforge_subscriptions"] == 7


def find_promtool() -> Optional[str]:
    for candidate in (os.environ.get("EVENTFORGE_PROMTOOL"), shutil.which("promtool"),
                      "/tmp/prom/usr/bin/promtool"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def test_promtool_check_metrics_accepts_the_text_format(stack):
    promtool = find_promtool()
    if promtool is None:
        if IN_CI or os.environ.get("EVENTFORGE_PROMTOOL"):
            pytest.fail("promtool is required in CI (.ci/run installs it)")
        pytest.skip("promtool not installed (CI installs it)")
    stack.caller.call("add", 1, 2)
    text = fetch(stack.port, "/metrics")[2]
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                            timeout=60)
    assert result.returncode == 0, (result.stdout + result.stderr).decode()


# -- security -----------------------------------------------------------------------


def test_token_required_and_compared(tcp, tmp_path, monkeypatch):
    monkeypatch.delenv(ef.MONITOR_TOKEN_ENV, raising=False)
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    monitor = tcp.own(ef.Monitor(port=0, token_file=str(token_file))).start()
    port = monitor.port
    status, headers, _ = fetch(port, "/varz")
    assert status == 401 and "Basic" in headers["WWW-Authenticate"]
    assert fetch(port, "/varz", headers={"Authorization": "Bearer wrong"})[0] == 401
    assert fetch(port, "/varz", headers={"Authorization": "Bearer s3cret-token"})[0] == 200
    basic = base64.b64encode(b"anyone:s3cret-token").decode()
    assert fetch(port, "/", headers={"Authorization": f"Basic {basic}"})[0] == 200
    wrong = base64.b64encode(b"anyone:s3cret").decode()
    assert fetch(port, "/", headers={"Authorization": f"Basic {wrong}"})[0] == 401
    assert fetch(port, "/", headers={"Authorization": "Basic !!notbase64"})[0] == 401


def test_token_from_the_environment(tcp, monkeypatch):
    monkeypatch.setenv(ef.MONITOR_TOKEN_ENV, "env-token")
    monitor = tcp.own(ef.Monitor(port=0)).start()
    assert fetch(monitor.port, "/healthz")[0] == 401
    assert fetch(monitor.port, "/healthz", headers={"Authorization": "Bearer env-token"})[0] == 200


def test_non_loopback_bind_needs_a_token(tmp_path, monkeypatch):
    monkeypatch.delenv(ef.MONITOR_TOKEN_ENV, raising=False)
    with pytest.raises(ValueError, match="needs a token"):
        ef.Monitor("0.0.0.0", 0)
    with pytest.raises(ValueError, match="needs a token"):
        ef.Monitor("192.0.2.10", 0)
    ef.Monitor("0.0.0.0", 0, allow_unauthenticated=True)  # explicit: allowed (not started)
    ef.Monitor("0.0.0.0", 0, token="t")
    empty = tmp_path / "empty"
    empty.write_text("  \n")
    with pytest.raises(ValueError, match="empty"):
        ef.Monitor(port=0, token_file=str(empty))
    with pytest.raises(ValueError, match="cannot read"):
        ef.Monitor(port=0, token_file=str(tmp_path / "missing"))
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        ef.Monitor(host, 0)


def test_a_bad_host_header_is_refused(stack):
    port = stack.port
    for host in ("evil.example", "evil.example:80", f"10.0.0.1:{port}", ""):
        status, body = get_json(port, "/varz", host=host)
        assert status == 403, host
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "localhost", f"[::1]:{port}"):
        assert fetch(port, "/healthz", host=host)[0] == 200, host
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:  # no Host at all
        sock.sendall(b"GET /varz HTTP/1.0\r\n\r\n")
        reply = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    assert reply.startswith(b"HTTP/1.0 403")


def test_allowed_hosts_adds_names(tcp):
    monitor = tcp.own(ef.Monitor(port=0, allowed_hosts=["mon.internal"])).start()
    assert fetch(monitor.port, "/healthz", host="mon.internal:8222")[0] == 200
    assert fetch(monitor.port, "/healthz", host="other.internal")[0] == 403


def test_hostile_names_come_out_escaped(stack):
    stack.queue.subscribe(HOSTILE, lambda m: None)
    evil = ef.TCPClientTransport("127.0.0.1", stack.server.port,
                                 name='"><img src=x onerror=alert(1)>')
    try:
        evil.connect(5)
        wait_for(lambda: len(stack.server.connections()) == 2, what="second connection")
        page = fetch(stack.port, "/")[2].decode()
        assert "<script>alert" not in page and "<img src=x" not in page
        assert "&lt;img src=x onerror=alert(1)&gt;" in page
        status, body = get_json(stack.port, "/subsz")
        assert HOSTILE in [r["pattern"] for r in body["patterns"]]
        metrics = fetch(stack.port, "/metrics")[2].decode()
        assert 'pattern="x.<script>alert(1)</script>"' in metrics  # quoted label, plain text
    finally:
        evil.close()


def test_url_length_and_socket_timeouts_are_capped(tcp):
    monitor = tcp.own(ef.Monitor(port=0, request_timeout=0.5)).start()
    assert get_json(monitor.port, "/varz?" + "a" * 5000)[0] == 414
    with socket.create_connection(("127.0.0.1", monitor.port), timeout=30) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /varz HTTP/1.1\r\n")  # ...and never finishes the request
        received = b""
        while True:
            chunk = sock.recv(65536)  # our own timeout (30 s) would raise
            if not chunk:
                break
            received += chunk
        assert received == b""  # dropped without an answer after request_timeout
        assert time.monotonic() - started < 20


def test_too_many_concurrent_requests_get_a_503(tcp):
    # The idle sockets hold the four slots until we close them (well before
    # the 30 s request timeout, however busy the machine is).
    monitor = tcp.own(ef.Monitor(port=0, request_timeout=30)).start()
    idle = [socket.create_connection(("127.0.0.1", monitor.port), timeout=10) for _ in range(4)]
    try:
        wait_for(lambda: fetch(monitor.port, "/healthz")[0] == 503, what="a 503")
    finally:
        for sock in idle:
            sock.close()
    wait_for(lambda: fetch(monitor.port, "/healthz")[0] == 200, what="slots freed")


def test_lifecycle(no_leaks):
    monitor = ef.Monitor(port=0)
    assert monitor.address is None and "idle" in repr(monitor)
    with monitor:
        assert monitor.address == ("127.0.0.1", monitor.port) and monitor.port > 0
        assert monitor.start() is monitor
        assert any(t.name == f"eventforge-monitor-{monitor.port}" for t in threading.enumerate())
        assert fetch(monitor.port, "/healthz")[0] == 200
    monitor.close()
    with pytest.raises(RuntimeError):
        monitor.start()
    with pytest.raises(TypeError):
        ef.Monitor(port=0).watch(object())
    with pytest.raises(ValueError):
        ef.Monitor(port=70000)


def test_get_without_http(stack):
    assert stack.monitor.get("/healthz") == (200, {"status": "ok"})
    assert stack.monitor.get("/connz?sort=nope")[0] == 400
    status, text = stack.monitor.get("/metrics", accept="application/openmetrics-text")
    assert status == 200 and text.endswith("# EOF\n")


# -- the page in a real browser ---------------------------------------------------------


def find_chromium() -> Optional[str]:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--enable-logging=stderr",
                  "--v=0", "--virtual-time-budget=5000"]


def test_the_page_in_headless_chromium(stack, tmp_path):
    chromium = find_chromium()
    if chromium is None:
        if IN_CI:
            pytest.fail("chromium is required in CI (.ci/run installs it)")
        pytest.skip("chromium not installed (CI installs it)")
    stack.caller.call("add", 1, 2)
    stack.queue.subscribe(HOSTILE, lambda m: None)
    url = stack.monitor.url
    result = subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", url],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    console = [line for line in result.stderr.splitlines() if ":CONSOLE" in line]
    assert not console, console  # no script error, no CSP violation, nothing logged
    dom = result.stdout
    assert '<span id="poll-state">live</span>' in dom  # the polling script ran
    assert re.search(r'<strong class="ok">ok</strong>', dom)
    assert "<td>math</td><td class=\"text\">add</td><td>1</td>" in dom
    assert re.search(r'<td>jobs\.email</td>(<td>[^<]*</td>){3}<td class="alert">2</td>', dom)
    assert "<td>jobs.sms</td><td>0</td><td>0</td><td>1</td><td>0</td>" in dom  # not highlighted
    assert "client-one" in dom
    assert "<script>alert(1)" not in dom
    for path in ("/varz", "/metrics", "/connz", "/rpcz", "/queuez"):
        assert f'href="{path}"' in dom
    os.makedirs(ARTIFACTS, exist_ok=True)
    shot = os.path.join(ARTIFACTS, "monitor-page.png")
    result = subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile2'}",
         "--window-size=1200,1100", f"--screenshot={shot}", url],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and os.path.getsize(shot) > 1000, result.stderr[-2000:]


def test_the_page_works_without_javascript(stack):
    page = fetch(stack.port, "/")[2].decode()
    # Everything is in the HTML; the script only adds optional polling.
    assert "<td>math</td>" in page and "jobs.email" in page and "health: " in page
    assert '<p id="controls" hidden' in page
    js = fetch(stack.port, "/monitor.js")
    assert js[1]["Content-Type"].startswith("text/javascript") and b"inFlight" in js[2]


# -- the worker ------------------------------------------------------------------------------


HANDLERS = "HANDLERS = {'add': lambda a, b: a + b}\nSERVICE_NAME = 'calc'\n"


def test_worker_with_monitor_serves_every_endpoint(tmp_path):
    module = tmp_path / "calc_handlers.py"
    module.write_text(HANDLERS)
    token = tmp_path / "token"
    token.write_text("worker-token")
    worker = Worker("--import", str(module), "--monitor", "127.0.0.1:0",
                    "--monitor-token-file", str(token), "--log-level", "WARNING",
                    "--monitor-allowed-host", "scrape.example")
    try:
        line = next(line for line in worker.stdout if "monitor:" in line)
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)/", line).group(1))
        transport = ef.TCPClientTransport("127.0.0.1", worker.port).connect(5)
        with ef.MessageQueue(transport) as queue:
            assert ef.RPCClient(queue, "calc").call("add", 2, 2) == 4
        auth = {"Authorization": "Bearer worker-token"}
        assert fetch(port, "/varz")[0] == 401
        for path in ENDPOINTS:
            status, headers, body = fetch(port, path, headers=auth)
            assert status == 200, (path, body[:300])
        _, _, body = fetch(port, "/rpcz", headers=auth)
        assert json.loads(body)["services"]["calc"]["methods"]["add"]["calls"] == 1
        _, _, body = fetch(port, "/varz", headers=auth)
        assert json.loads(body)["total_connections"] == 1
        assert fetch(port, "/healthz", headers=auth, host="scrape.example:9100")[0] == 200
        assert fetch(port, "/healthz", headers=auth, host="other.example")[0] == 403
    finally:
        assert worker.stop() == 0
        worker.close()


def test_worker_monitor_flag_errors(tmp_path, monkeypatch):
    from _worker_helpers import run_cli

    monkeypatch.delenv(ef.MONITOR_TOKEN_ENV, raising=False)
    module = tmp_path / "calc_handlers.py"
    module.write_text(HANDLERS)
    result = run_cli("worker", "--import", str(module), "--port", "0", "--monitor", "nope")
    assert result.returncode == 2 and "HOST:PORT" in result.stderr
    result = run_cli("worker", "--import", str(module), "--port", "0",
                     "--monitor", "0.0.0.0:0")
    assert result.returncode == 2 and "needs a token" in result.stderr


@pytest.mark.parametrize("durable", [False, True])
def test_a_real_work_queue_on_queuez_the_page_and_metrics(tcp, tmp_path, durable):
    store = str(tmp_path / "jobs.db") if durable else None
    work = tcp.own(ef.WorkQueue(max_retries=0, store=store))
    for n in range(6):
        work.enqueue("jobs.email", {"n": n})
    job = work.dequeue("jobs.email", timeout=5)
    assert work.ack(job)
    job = work.dequeue("jobs.email", timeout=5)
    assert work.nack(job, requeue=False)  # -> jobs.email.dead_letter
    monitor = tcp.own(ef.Monitor(port=0)).start()
    monitor.watch(work, "mail")
    _, body = get_json(monitor.port, "/queuez")
    row = body["queues"]["mail"]
    assert (row["ready"], row["in_flight"], row["dead_letters"]) == (4, 0, 1)
    assert row["acked_total"] == 1 and row["dead_lettered_total"] == 1
    assert row["nacked_total"] == 1
    if durable:  # the SQLite store does not tell its oldest job: unknown, not 0
        assert row["oldest_ready_age_seconds"] is None
    else:
        assert row["oldest_ready_age_seconds"] >= 0
    assert row["wait_seconds"]["count"] == 2
    assert set(row["topics"]) == {"jobs.email", "jobs.email.dead_letter"}
    page = fetch(monitor.port, "/")[2].decode()
    assert re.search(r'<td>mail</td><td>4</td><td>0</td><td>0</td><td class="alert">1</td>', page)
    samples = om_samples(fetch(monitor.port, "/metrics", headers={
        "Accept": "application/openmetrics-text"})[2].decode())
    values = {(name, labels): value for name, labels, value in samples}
    assert values[("eventforge_queue_wait_seconds_count", (("queue", "mail"),))] == 2
    assert values[("eventforge_queue_dead_letters", (("queue", "mail"),))] == 1
    check_histograms(samples)


@pytest.mark.parametrize("doc", ["README.md", "docs/monitor.md"])
def test_the_documented_scrape_config_passes_promtool_check_config(doc, tmp_path):
    promtool = find_promtool()
    if promtool is None:
        if IN_CI or os.environ.get("EVENTFORGE_PROMTOOL"):
            pytest.fail("promtool is required in CI (.ci/run installs it)")
        pytest.skip("promtool not installed (CI installs it)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, doc), encoding="utf-8") as fh:
        blocks = re.findall(r"```yaml\n(.*?)```", fh.read(), re.S)
    assert len(blocks) == 1, doc
    token = tmp_path / "token"
    token.write_text("t")
    config = tmp_path / "prometheus.yml"
    config.write_text(blocks[0].replace("/etc/prometheus/eventforge-monitor-token", str(token)))
    result = subprocess.run([promtool, "check", "config", str(config)], capture_output=True,
                            timeout=60)
    assert result.returncode == 0, (result.stdout + result.stderr).decode()


def raw_request(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        reply = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return reply
            reply += chunk


@pytest.mark.parametrize("request_bytes, status", [
    (b"<script>alert(1)</script>\r\n\r\n", b"400"),
    (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", b"414"),
    (b"GET /varz HTTP/1.1\r\nHost: localhost\r\n" + b"X: y\r\n" * 200 + b"\r\n", b"431"),
    (b"GET /varz HTTP/9.9\r\nHost: localhost\r\n\r\n", b"505"),
    (b"BREW /varz HTTP/1.1\r\nHost: localhost\r\n\r\n", b"501"),
])
def test_malformed_requests_get_json_errors_that_echo_nothing(tcp, request_bytes, status):
    monitor = tcp.own(ef.Monitor(port=0)).start()
    reply = raw_request(monitor.port, request_bytes)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 " + status), reply[:200]
    assert b"X-Content-Type-Options: nosniff" in head
    assert b"script" not in body and b"aaaa" not in body and b"BREW" not in body
    assert json.loads(body)["error"]


def test_close_does_not_wait_for_idle_clients(no_leaks):
    monitor = ef.Monitor(port=0, request_timeout=60).start()
    idle = socket.create_connection(("127.0.0.1", monitor.port), timeout=10)
    try:
        wait_for(lambda: monitor.requests_in_progress, what="the idle request being served")
        started = time.monotonic()
        monitor.close()
        assert time.monotonic() - started < 30  # not the 60 s request timeout
        assert idle.recv(100) == b""  # the server hung up
    finally:
        idle.close()


# -- properties ----------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=12), st.integers(0, 10 ** 6), max_size=40),
       st.integers(2, 12))
def test_folding_keeps_the_total_and_caps_the_keys(values, cap):
    folded, n = ef._fold(dict(values), cap, ef._merge_numbers)
    assert len(folded) <= cap
    assert sum(folded.values()) == sum(values.values())
    assert n == (0 if len(values) <= cap else len(values) - (cap - 1))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0, 100, allow_nan=False), min_size=1, max_size=50),
       st.floats(0.01, 0.99), st.floats(0.01, 0.99))
def test_quantiles_are_monotonic_and_inside_the_buckets(observations, q1, q2):
    hist = ef._Histogram()
    for value in observations:
        hist.observe(value)
    snap = hist.snapshot()
    low, high = sorted((q1, q2))
    a, b = ef._histogram_quantile(low, snap), ef._histogram_quantile(high, snap)
    assert 0 <= a <= b <= ef.DURATION_BUCKETS[-1]
    assert snap["buckets"][-1][1] == snap["count"] == len(observations)


@settings(max_examples=80, deadline=None)
@given(st.text(max_size=30))
def test_any_label_value_survives_both_formats(value):
    writer_om, writer_text = ef._MetricsWriter(True), ef._MetricsWriter(False)
    for writer in (writer_om, writer_text):
        writer.gauge("eventforge_probe", "A probe.", [({"pattern": value}, 1)])
    (om,) = [s for s in om_samples(writer_om.text()) if s[0] == "eventforge_probe"]
    (text,) = [s for s in prom_samples(writer_text.text()) if s[0] == "eventforge_probe"]
    assert om == text == ("eventforge_probe", (("pattern", value),), 1.0)


def test_real_meters_and_a_task_pool_on_meterz_and_metrics():
    timing, metrics = ef.TimingMeter(), ef.MetricsMeter()

    @ef.task(on_execute=[timing, metrics], max_instances=2)
    def double(x):
        return x * 2

    assert double(2) == 4 and double(3) == 6
    monitor = ef.Monitor(port=0, components=[timing, metrics])
    monitor.watch(double.pool, "double-pool")
    meters = monitor.get("/meterz")[1]["meters"]
    assert meters["TimingMeter"]["count"] == 2
    assert meters["MetricsMeter"] == {"calls": 2, "successes": 2, "failures": 0}
    assert meters["double-pool"]["total_processed"] == 2
    values = {(name, labels): value for name, labels, value in
              om_samples(monitor.metrics(openmetrics=True))}
    assert values[("eventforge_meter", (("meter", "MetricsMeter"), ("stat", "calls")))] == 2
    assert values[("eventforge_meter", (("meter", "double-pool"), ("stat", "max")))] == 2


def test_a_queue_worker_with_monitor_shows_its_work_queue(tmp_path):
    from _worker_helpers import Proc

    module = tmp_path / "mail_jobs.py"
    module.write_text("JOBS = {'mail.send': lambda job: None}\n")
    db = str(tmp_path / "jobs.db")
    with ef.WorkQueue(store=db) as producer:
        for n in range(3):
            producer.enqueue("mail.send", {"n": n})
    worker = Proc([sys.executable, "-m", "eventforge", "worker", "--import", str(module),
                   "--queue", db, "--monitor", "127.0.0.1:0", "--log-level", "WARNING"])
    try:
        port = int(worker.wait_for(re.compile(r"monitor: http://127\.0\.0\.1:(\d+)/")).group(1))

        def acked() -> Any:
            status, body = get_json(port, "/queuez")
            row = body["queues"].get("jobs")
            return row if status == 200 and row and row["acked_total"] == 3 else None

        row = wait_for(acked, what="the worker to do the three jobs")
        assert row["ready"] == 0 and row["dead_letters"] == 0
        assert fetch(port, "/metrics")[0] == 200 and fetch(port, "/")[0] == 200
    finally:
        worker.signal()
        assert worker.wait(30) == 0
        worker.close()


def test_worker_monitor_errors_speak_in_cli_options(tmp_path, monkeypatch):
    """The CLI names its own flags, not Monitor's keyword arguments, and hides errno."""
    import socket

    from _worker_helpers import one_error_line, run_cli

    monkeypatch.delenv(ef.MONITOR_TOKEN_ENV, raising=False)
    module = tmp_path / "calc_handlers.py"
    module.write_text(HANDLERS + "\nJOBS = {'calc.jobs': print}\n")  # serves both ways
    result = run_cli("worker", "--import", str(module), "--port", "0",
                     "--monitor", "0.0.0.0:0")
    line = one_error_line(result)
    assert result.returncode == 2
    assert "needs a token" in line and "--monitor-token-file" in line
    assert "allow_unauthenticated" not in line and "token_file=" not in line
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for mode in (["--port", "0"], ["--queue", str(tmp_path / "jobs.db")]):
            result = run_cli("worker", "--import", str(module), *mode,
                             "--log-level", "WARNING", "--monitor", f"127.0.0.1:{port}")
            assert result.returncode == 1, result.stderr
            line = one_error_line(result)
            assert line == (f"eventforge worker: error: monitor cannot listen on "
                            f"127.0.0.1:{port}: Address already in use"), line
