"""Pydantic Logfire for eventforge tasks and meters.

``pip install 'eventforge[logfire]'`` installs logfire; this module imports it
only when a LogfireMeter or LogfireMetricLogger is created.  Also importable
as ``eventforge.integrations.logfire``.

* :class:`LogfireMeter`, an observer (``@task(on_execute=[LogfireMeter()])``):
  one Logfire span per task call, carrying the task's name and id, and as
  configured its arguments, its result and its error; it is also a Meter of
  the calls' execution time.
* :class:`LogfireMetricLogger`, a Reporter: every measurement of every Meter
  (or of the meters given) becomes a point of a Logfire histogram.

Task names, span names and values are passed to Logfire as attributes, never
as (part of) a message template, so braces in user data are never
interpreted.  Configure Logfire itself (``logfire.configure(...)``) as usual;
both classes use the default Logfire instance unless given ``logfire=``.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Sequence, Union

import eventforge as ef

from ._broker import require

__all__ = ["LogfireMeter", "LogfireMetricLogger"]

#: The message template of every span: a constant, filled from attributes.
SPAN_TEMPLATE = "eventforge task {task_name}"
_METRIC_NAME_BAD = re.compile(r"[^A-Za-z0-9_.\-/]")


def _default_logfire(instance: Any) -> Any:
    if instance is not None:
        return instance
    return require("logfire", "logfire", "logfire")


class LogfireMeter(ef.Meter):
    """A Logfire span around every call of the tasks it observes.

    ``span_name``: the span's name, a string or a callable taking the
    :class:`~eventforge.TaskContext` (default: the task's name).
    ``log_args`` / ``log_result`` / ``log_errors``: add the call's ``args``
    and ``kwargs``, its ``result``, and on failure ``error_type`` and
    ``error_message`` plus the exception itself (the span's level becomes
    ``error``).  ``tags`` are Logfire tags; ``attributes`` are added to
    every span.  As a Meter it records each call's execution time
    (reduction ``"mean"`` unless told otherwise).

    The span is entered before the task's body runs and left after the
    last hook, on the calling thread, so spans opened by the body nest
    inside it.
    """

    def __init__(
        self,
        span_name: Union[str, Callable[[ef.TaskContext], str], None] = None,
        *,
        log_args: bool = True,
        log_result: bool = False,
        log_errors: bool = True,
        tags: Sequence[str] = (),
        attributes: Optional[Mapping[str, Any]] = None,
        logfire: Any = None,
        name: Optional[str] = None,
        reduction: str = "mean",
    ) -> None:
        if span_name is not None and not (isinstance(span_name, str) or callable(span_name)):
            raise TypeError(f"span_name must be a string or a callable, not {span_name!r}")
        bad = [key for key in (attributes or {}) if not isinstance(key, str) or key[:1] == "_"]
        if bad:
            raise ValueError(f"attribute names must be strings not starting with '_': {bad}")
        super().__init__(name, reduction=reduction)
        self.logfire = _default_logfire(logfire)
        self.span_name = span_name
        self.log_args = log_args
        self.log_result = log_result
        self.log_errors = log_errors
        self.tags = tuple(tags)
        self.attributes: Dict[str, Any] = dict(attributes or {})

    def _span_name_for(self, ctx: ef.TaskContext) -> str:
        span_name = self.span_name
        if span_name is None:
            return ctx.task_name
        if isinstance(span_name, str):
            return span_name
        return str(span_name(ctx))

    def measure(self, ctx: ef.TaskContext) -> Optional[float]:
        """The call's execution time in seconds."""
        return ctx.execution_time

    def on_start(self, ctx: ef.TaskContext) -> None:
        """Open and enter the call's span."""
        attributes = dict(self.attributes)
        attributes.update(task_name=ctx.task_name, task_id=ctx.task_id, trigger=ctx.trigger)
        if self.log_args:
            attributes["args"] = list(ctx.args)
            attributes["kwargs"] = dict(ctx.kwargs)
        span = self.logfire.span(
            SPAN_TEMPLATE, _span_name=self._span_name_for(ctx), _tags=self.tags or None,
            **attributes,
        )
        ctx.metadata[self] = span.__enter__()

    def on_success(self, ctx: ef.TaskContext) -> None:
        """Add the result (with ``log_result``)."""
        span = ctx.metadata.get(self)
        if span is not None and self.log_result:
            span.set_attribute("result", ctx.result)

    def on_failure(self, ctx: ef.TaskContext) -> None:
        """Mark the span as an error and attach the exception (with ``log_errors``)."""
        span = ctx.metadata.get(self)
        if span is None or ctx.error is None:
            return
        span.set_level("error")
        if self.log_errors:
            span.set_attribute("error_type", ctx.error_type or type(ctx.error).__name__)
            span.set_attribute("error_message", str(ctx.error))
            span.record_exception(ctx.error)

    def on_complete(self, ctx: ef.TaskContext) -> None:
        """Record the execution time and leave the span."""
        span = ctx.metadata.pop(self, None)
        try:
            super().on_complete(ctx)
        finally:
            if span is not None:
                span.set_attribute("execution_time", ctx.execution_time)
                span.__exit__(None, None, None)


class LogfireMetricLogger(ef.Reporter):
    """Sends meter measurements to Logfire as histogram points.

    Each meter gets the histogram ``prefix + meter.name`` (characters a
    metric name cannot hold become ``_``); each point carries the attribute
    ``task`` (the task's name) when the measurement came from a task call.
    ``meters`` limits it to those meters (default: every Meter).  Stop it
    with :meth:`unregister` (or a ``with`` block).
    """

    def __init__(
        self,
        meters: Optional[Iterable[ef.Meter]] = None,
        *,
        prefix: str = "eventforge.",
        unit: str = "",
        logfire: Any = None,
        weak: bool = False,
    ) -> None:
        self.logfire = _default_logfire(logfire)
        self.prefix = prefix
        self.unit = unit
        self.meters = None if meters is None else list(meters)
        self._histograms: Dict[str, Any] = {}
        super().__init__(weak=weak)

    def metric_name(self, meter: ef.Meter) -> str:
        """The histogram name used for ``meter``."""
        return _METRIC_NAME_BAD.sub("_", f"{self.prefix}{meter.name}")[:255]

    @ef.observe(ef.Meter, "measurement")
    def on_measurement(self, meter: ef.Meter, value: Any, ctx: Optional[ef.TaskContext]) -> None:
        """Record one measurement of a Meter."""
        if self.meters is not None and not any(meter is m for m in self.meters):
            return
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return
        name = self.metric_name(meter)
        histogram = self._histograms.get(name)
        if histogram is None:
            histogram = self._histograms[name] = self.logfire.metric_histogram(
                name, unit=self.unit, description=f"eventforge meter {meter.name}"
            )
        attributes = {"task": ctx.task_name} if ctx is not None else {}
        histogram.record(value, attributes)
