"""LogfireMeter and LogfireMetricLogger, offline, with logfire's own in-memory capture."""
# ruff: noqa: F811  (the capfire fixture is imported, then named by each test)

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from _servers import require_module

import eventforge as ef

require_module("logfire")

from logfire.testing import CaptureLogfire, capfire  # noqa: E402,F401

from eventforge_ext.logfire import SPAN_TEMPLATE, LogfireMeter, LogfireMetricLogger  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_executors():
    """logfire.configure() patches the submit() of both concurrent.futures pools
    for the whole process; undo that so later tests run on the plain pools."""
    from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

    saved = ThreadPoolExecutor.submit, ProcessPoolExecutor.submit
    yield
    ThreadPoolExecutor.submit, ProcessPoolExecutor.submit = saved


def _task_spans(capfire: CaptureLogfire) -> list:
    spans = capfire.exporter.exported_spans_as_dict()
    return [s for s in spans if s["attributes"].get("logfire.msg_template") == SPAN_TEMPLATE]


def test_a_span_per_call_with_args_and_result(capfire):
    meter = LogfireMeter(log_result=True, tags=["billing"], attributes={"team": "core"})

    @ef.task(on_execute=[meter])
    def add(a, b=0):
        return a + b

    assert add(2, b=3) == 5
    assert add(1) == 1
    spans = _task_spans(capfire)
    assert [s["name"] for s in spans] == ["add", "add"]
    first = spans[0]["attributes"]
    assert first["task_name"] == "add"
    assert first["logfire.msg"] == "eventforge task add"
    assert first["logfire.tags"] == ("billing",)
    assert first["team"] == "core"
    assert first["result"] == 5
    assert "[2]" in str(first["args"]) and "3" in str(first["kwargs"])
    assert first["execution_time"] >= 0
    assert first["task_id"] != spans[1]["attributes"]["task_id"]
    assert meter.count == 2  # also a Meter of the execution time


def test_failures_mark_the_span_as_an_error(capfire):
    meter = LogfireMeter()

    @ef.task(on_execute=[meter])
    def fail(x):
        raise ValueError(f"bad {x}")

    with pytest.raises(ValueError):
        fail(7)
    (span,) = _task_spans(capfire)
    attributes = span["attributes"]
    assert attributes["error_type"] == "ValueError"
    assert attributes["error_message"] == "bad 7"
    assert attributes["logfire.level_num"] >= 17  # error
    assert any(e["name"] == "exception" for e in span["events"])
    assert "result" not in attributes


def test_args_result_and_errors_only_as_configured(capfire):
    meter = LogfireMeter(log_args=False, log_result=False, log_errors=False)

    @ef.task(on_execute=[meter])
    def secret(password):
        if password == "bad":
            raise KeyError(password)
        return password

    secret("hunter2")
    with pytest.raises(KeyError):
        secret("bad")
    spans = _task_spans(capfire)
    assert len(spans) == 2
    for span in spans:
        attributes = span["attributes"]
        assert not {"args", "kwargs", "result", "error_message"} & set(attributes)
        assert "hunter2" not in str(attributes)


def test_span_name_string_or_callable(capfire):
    @ef.task(on_execute=[LogfireMeter("fixed-name")])
    def one():
        return 1

    @ef.task(on_execute=[LogfireMeter(lambda ctx: f"run:{ctx.task_name}:{ctx.args[0]}")])
    def two(x):
        return x

    one()
    two("a")
    assert [s["name"] for s in _task_spans(capfire)] == ["fixed-name", "run:two:a"]


def test_user_data_never_becomes_a_template(capfire):
    @ef.task(on_execute=[LogfireMeter(lambda ctx: "{task_id} {0} {missing}", log_result=True)])
    def braces(text):
        return "{result}"

    braces.__name__ = "x{y}"
    assert braces("{args} {{") == "{result}"
    (span,) = _task_spans(capfire)
    assert span["name"] == "{task_id} {0} {missing}"
    assert span["attributes"]["result"] == "{result}"
    assert "{args} {{" in str(span["attributes"]["args"])


def test_spans_opened_by_the_body_nest_inside(capfire):
    import logfire

    @ef.task(on_execute=[LogfireMeter()])
    def outer():
        with logfire.span("inner work"):
            return 1

    outer()
    spans = {s["name"]: s for s in capfire.exporter.exported_spans_as_dict()}
    assert spans["inner work"]["parent"]["span_id"] == spans["outer"]["context"]["span_id"]


def test_invalid_configuration():
    with pytest.raises(TypeError):
        LogfireMeter(span_name=42)
    with pytest.raises(ValueError):
        LogfireMeter(attributes={"_tags": 1})


def test_metric_logger_records_every_meter(capfire):
    timing = ef.TimingMeter()
    manual = ef.Meter("orders processed", reduction="sum")
    with LogfireMetricLogger(prefix="app.") as reporter:

        @ef.task(on_execute=[timing])
        def work():
            return 1

        work()
        work()
        manual.update(5)
        assert reporter.metric_name(manual) == "app.orders_processed"
    manual.update(100)  # after unregister: not recorded
    # OpenTelemetry instrument names are case-insensitive (exported lower-case)
    metrics = {m["name"]: m for m in capfire.get_collected_metrics()}
    timing_points = metrics[f"app.{timing.name}".lower()]["data"]["data_points"]
    assert sum(p["count"] for p in timing_points) == 2
    assert timing_points[0]["attributes"] == {"task": "work"}
    (point,) = metrics["app.orders_processed"]["data"]["data_points"]
    assert point["count"] == 1 and point["sum"] == 5


def test_metric_logger_limited_to_given_meters(capfire):
    chosen, other = ef.Meter("chosen"), ef.Meter("other")
    reporter = LogfireMetricLogger([chosen])
    try:
        chosen.update(1.5)
        other.update(2.5)
    finally:
        reporter.unregister()
    names = {m["name"] for m in capfire.get_collected_metrics()}
    assert "eventforge.chosen" in names and "eventforge.other" not in names


def test_import_alias_and_missing_package():
    from eventforge.integrations.logfire import LogfireMeter as Aliased

    assert Aliased is LogfireMeter
    code = (
        "import sys; sys.modules['logfire'] = None\n"
        "import eventforge_ext.logfire as m\n"
        "try:\n    m.LogfireMeter()\nexcept ImportError as exc:\n    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert "pip install 'eventforge[logfire]'" in out.stdout, out.stderr
