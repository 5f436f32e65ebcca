"""Count what the control API sees, in a per-app Prometheus registry served at `/metrics`.

The registry belongs to one application (never prometheus-client's global one), so any
number of apps can live in one process. Plugin counts by state are computed at scrape time
from the manager; runs, reloads and denials are counted as the API handles them.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

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


class ApiMetrics:
    """The API's metrics: one registry, created with the app."""

    def __init__(self, records: Callable[[], Iterable[PluginRecord]]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_PluginStates(records))
        self._runs = Counter(
            "aisoc_plugind_runs",
            "Plugin runs by plugin and outcome (ok or the error code).",
            ["plugin_id", "outcome"],
            registry=self.registry,
        )
        self._run_seconds = Histogram(
            "aisoc_plugind_run_duration_seconds",
            "Run latency as the API saw it.",
            ["plugin_id"],
            buckets=RUN_BUCKETS,
            registry=self.registry,
        )
        self._reloads = Counter(
            "aisoc_plugind_reloads",
            "Reloads by outcome (ok, failed), from the API, the watcher or an OCI install.",
            ["outcome"],
            registry=self.registry,
        )
        self._denied = Counter(
            "aisoc_plugind_api_denied",
            "Denied API requests by reason.",
            ["reason"],
            registry=self.registry,
        )
        self._requests = Counter(
            "aisoc_plugind_api_requests",
            "API requests by method, route template and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )

    def run(self, plugin_id: str, outcome: str, seconds: float) -> None:
        """Count one run of a known plugin."""
        self._runs.labels(plugin_id=plugin_id, outcome=outcome).inc()
        self._run_seconds.labels(plugin_id=plugin_id).observe(seconds)

    def observe(self, event: Mapping[str, Any]) -> None:
        """Count what the event stream says (an EventLog listener): every reload, whoever
        triggered it."""
        name = event.get("event")
        if name == names.PLUGIN_RELOAD_COMPLETED:
            self._reloads.labels(outcome="ok").inc()
        elif name == names.PLUGIN_RELOAD_FAILED:
            self._reloads.labels(outcome="failed").inc()

    def denied(self, reason: str) -> None:
        """Count one denied request."""
        self._denied.labels(reason=reason).inc()

    def request(self, method: str, route: str, status: int) -> None:
        """Count one answered request (route is the template, never the raw path)."""
        self._requests.labels(method=method, route=route, status=str(status)).inc()

    def render(self) -> bytes:
        """Return the Prometheus text exposition of this registry."""
        return generate_latest(self.registry)
