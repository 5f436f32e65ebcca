"""Count what the control API sees, in a per-app Prometheus registry served at `/metrics`.

The registry belongs to one application (never prometheus-client's global one), so any
number of apps can live in one process. Plugin counts by state are computed at scrape time
from the manager; runs, reloads and denials are counted as the API handles them.
"""

from __future__ import annotations

import bisect
import itertools
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from aisoc_plugind.audit import names
from aisoc_plugind.core.records import PluginRecord, State

__all__ = ["CONTENT_TYPE", "ApiMetrics"]

CONTENT_TYPE = CONTENT_TYPE_LATEST
RUN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _PluginStates(Collector):
    """`aisoc_plugind_plugins{state}`: how many plugins are in each state, at scrape time."""

    def __init__(self, records: Callable[[], Iterable[PluginRecord]]) -> None:
        self._records = records

    def _family(self) -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "aisoc_plugind_plugins", "Plugins by lifecycle state.", labels=["state"]
        )

    def describe(self) -> Iterator[Metric]:
        yield self._family()

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        counts = Tally(r.state.value for r in self._records())
        for state in State:
            family.add_metric([state.value], counts.get(state.value, 0))
        yield family


class _Histogram:
    """Bucket counts and a sum, kept as plain numbers."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(RUN_BUCKETS) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(RUN_BUCKETS, value)] += 1
        self.total += value

    def buckets(self) -> list[tuple[str, float]]:
        bounds = [*map(floatToGoString, RUN_BUCKETS), "+Inf"]
        return list(zip(bounds, itertools.accumulate(self.counts), strict=True))


class _Counted(Collector):
    """The counters the API keeps (plain dicts: cheap per request), rendered at scrape time."""

    def __init__(self) -> None:
        self.runs: dict[tuple[str, str], int] = {}
        self.latency: dict[str, _Histogram] = {}
        self.reloads: dict[str, int] = {}
        self.denied: dict[str, int] = {}
        self.requests: dict[tuple[str, str, int], int] = {}

    def collect(self) -> Iterator[Metric]:
        runs = CounterMetricFamily(
            "aisoc_plugind_runs",
            "Plugin runs by plugin and outcome (ok or the error code).",
            labels=["plugin_id", "outcome"],
        )
        for (plugin_id, outcome), n in sorted(self.runs.items()):
            runs.add_metric([plugin_id, outcome], n)
        latency = HistogramMetricFamily(
            "aisoc_plugind_run_duration_seconds",
            "Run latency as the API saw it.",
            labels=["plugin_id"],
        )
        for plugin_id, histogram in sorted(self.latency.items()):
            latency.add_metric([plugin_id], histogram.buckets(), histogram.total)
        reloads = CounterMetricFamily(
            "aisoc_plugind_reloads",
            "Reloads by outcome (ok, failed), from the API, the watcher or an OCI install.",
            labels=["outcome"],
        )
        for outcome, n in sorted(self.reloads.items()):
            reloads.add_metric([outcome], n)
        denied = CounterMetricFamily(
            "aisoc_plugind_api_denied", "Denied API requests by reason.", labels=["reason"]
        )
        for reason, n in sorted(self.denied.items()):
            denied.add_metric([reason], n)
        requests = CounterMetricFamily(
            "aisoc_plugind_api_requests",
            "API requests by method, route template and status.",
            labels=["method", "route", "status"],
        )
        for (method, route, status), n in sorted(self.requests.items()):
            requests.add_metric([method, route, str(status)], n)
        yield from (runs, latency, reloads, denied, requests)


class ApiMetrics:
    """The API's metrics: one registry, created with the app.

    Counting is a dict increment on the request path; the Prometheus families are built
    when `/metrics` is scraped. Label values are bounded: plugin ids are known ones (a run
    of an unknown id is a 404 before it is counted), routes are templates.
    """

    # The events `observe` counts (an EventLog listener is called for these only).
    OBSERVED = frozenset({names.PLUGIN_RELOAD_COMPLETED, names.PLUGIN_RELOAD_FAILED})

    def __init__(self, records: Callable[[], Iterable[PluginRecord]]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_PluginStates(records))
        self._counted = _Counted()
        self.registry.register(self._counted)

    def run(self, plugin_id: str, outcome: str, seconds: float) -> None:
        """Count one run of a known plugin."""
        counted = self._counted
        key = (plugin_id, outcome)
        counted.runs[key] = counted.runs.get(key, 0) + 1
        histogram = counted.latency.get(plugin_id)
        if histogram is None:
            histogram = counted.latency[plugin_id] = _Histogram()
        histogram.observe(seconds)

    def observe(self, event: Mapping[str, Any]) -> None:
        """Count what the event stream says (an EventLog listener): every reload, whoever
        triggered it."""
        name = event.get("event")
        if name == names.PLUGIN_RELOAD_COMPLETED:
            _bump(self._counted.reloads, "ok")
        elif name == names.PLUGIN_RELOAD_FAILED:
            _bump(self._counted.reloads, "failed")

    def denied(self, reason: str) -> None:
        """Count one denied request."""
        _bump(self._counted.denied, reason)

    def request(self, method: str, route: str, status: int) -> None:
        """Count one answered request (route is the template, never the raw path)."""
        key = (method, route, status)
        requests = self._counted.requests
        requests[key] = requests.get(key, 0) + 1

    def render(self) -> bytes:
        """Return the Prometheus text exposition of this registry."""
        return generate_latest(self.registry)


def _bump(counts: dict[str, int], key: str) -> None:
    counts[key] = counts.get(key, 0) + 1
