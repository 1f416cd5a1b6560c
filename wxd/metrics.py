"""A small Prometheus text-format registry: counters, gauges, histograms, with labels.

Pure: standard library only. Components receive the Registry they report to (dependency
injection, no globals); `/metrics` awaits the registered collectors, then renders.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Awaitable, Callable, Iterable
from typing import cast

LabelValues = tuple[str, ...]
DEFAULT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: tuple[str, ...], values: LabelValues, extra: str = "") -> str:
    parts = [f'{name}="{_escape(value)}"' for name, value in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class _Metric:
    kind = ""

    def __init__(self, name: str, help_text: str, labels: Iterable[str] = ()) -> None:
        self.name = name
        self.help = help_text
        self.label_names = tuple(labels)

    def _key(self, labels: dict[str, str]) -> LabelValues:
        if set(labels) != set(self.label_names):
            raise ValueError(f"{self.name} takes labels {self.label_names}, got {tuple(labels)}")
        return tuple(str(labels[name]) for name in self.label_names)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]

    def samples(self) -> list[str]:
        raise NotImplementedError


class Counter(_Metric):
    """Monotonic count."""

    kind = "counter"

    def __init__(self, name: str, help_text: str, labels: Iterable[str] = ()) -> None:
        super().__init__(name, help_text, labels)
        self.values: dict[LabelValues, float] = {}
        if not self.label_names:
            self.values[()] = 0.0

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = self._key(labels)
        self.values[key] = self.values.get(key, 0.0) + amount

    def get(self, **labels: str) -> float:
        return self.values.get(self._key(labels), 0.0)

    def samples(self) -> list[str]:
        return [f"{self.name}{_labels(self.label_names, k)} {_number(v)}"
                for k, v in sorted(self.values.items())]


class Gauge(Counter):
    """A value that goes up and down; `set` replaces it."""

    kind = "gauge"

    def set(self, value: float, **labels: str) -> None:
        self.values[self._key(labels)] = float(value)

    def clear(self) -> None:
        self.values = {} if self.label_names else {(): 0.0}


class Histogram(_Metric):
    """Cumulative buckets plus sum and count, as Prometheus expects."""

    kind = "histogram"

    def __init__(self, name: str, help_text: str, labels: Iterable[str] = (),
                 buckets: Iterable[float] = DEFAULT_BUCKETS) -> None:
        super().__init__(name, help_text, labels)
        self.buckets = tuple(sorted(buckets))
        self.series: dict[LabelValues, tuple[list[int], list[float]]] = {}

    def observe(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        counts, totals = self.series.setdefault(key, ([0] * (len(self.buckets) + 1), [0.0]))
        counts[bisect.bisect_left(self.buckets, value)] += 1
        totals[0] += value

    def count(self, **labels: str) -> int:
        entry = self.series.get(self._key(labels))
        return sum(entry[0]) if entry else 0

    def samples(self) -> list[str]:
        lines: list[str] = []
        for key, (counts, totals) in sorted(self.series.items()):
            running = 0
            for bound, count in zip((*self.buckets, math.inf), counts, strict=True):
                running += count
                le = f'le="{_number(bound)}"'
                lines.append(f"{self.name}_bucket{_labels(self.label_names, key, le)} {running}")
            lines.append(f"{self.name}_sum{_labels(self.label_names, key)} {_number(totals[0])}")
            lines.append(f"{self.name}_count{_labels(self.label_names, key)} {running}")
        return lines


Collector = Callable[[], Awaitable[None]]


class Registry:
    """Holds every metric by name; asking twice for a name returns the same metric."""

    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}
        self._collectors: list[Collector] = []

    def _get(self, cls: type[_Metric], name: str, help_text: str, labels: tuple[str, ...],
             **kwargs: object) -> _Metric:
        """The metric `name`, created on first use. Modules that share a series declare it
        alike: another kind, other labels or another help text (empty = only looking it up)
        is a ValueError."""
        metric = self._metrics.get(name)
        if metric is None:
            metric = cls(name, help_text, labels, **kwargs)
            self._metrics[name] = metric
        elif type(metric) is not cls:
            raise ValueError(f"metric {name} already registered as {metric.kind}")
        elif metric.label_names != labels or (help_text and help_text != metric.help):
            raise ValueError(f"metric {name} already registered with labels "
                             f"{metric.label_names} and help {metric.help!r}")
        return metric

    def counter(self, name: str, help_text: str, labels: Iterable[str] = ()) -> Counter:
        return cast(Counter, self._get(Counter, name, help_text, tuple(labels)))

    def gauge(self, name: str, help_text: str, labels: Iterable[str] = ()) -> Gauge:
        return cast(Gauge, self._get(Gauge, name, help_text, tuple(labels)))

    def histogram(self, name: str, help_text: str, labels: Iterable[str] = (),
                  buckets: Iterable[float] = DEFAULT_BUCKETS) -> Histogram:
        return cast(Histogram, self._get(Histogram, name, help_text, tuple(labels), buckets=tuple(buckets)))

    def add_collector(self, collector: Collector) -> None:
        """Register an async callback run before each render (e.g. queue depth from SQLite)."""
        self._collectors.append(collector)

    async def collect(self) -> None:
        """Run every collector. If some raise, the first error is raised once all have run,
        so one failing collector does not leave the others' values stale."""
        first: Exception | None = None
        for collector in self._collectors:
            try:
                await collector()
            except Exception as exc:
                first = first or exc
        if first is not None:
            raise first

    def render(self) -> str:
        lines: list[str] = []
        for name in sorted(self._metrics):
            metric = self._metrics[name]
            lines.extend(metric.header())
            lines.extend(metric.samples())
        return "\n".join(lines) + "\n"
