"""The hub's Prometheus metrics (``GET /metrics``).

Gauges that mirror state (nodes online, rollouts by state, messages in/out,
store latency) are read at scrape time from the running service, so nothing on
the hot path updates them. Step durations and rejected commands are observed
from the ``StepStatus`` stream through ``observe_status``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import get_args

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from bus.messages import RolloutState, StepStatus

__all__ = ["HubMetrics", "MetricsSource"]

_STEP_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 1800)


@dataclass(frozen=True)
class MetricsSource:
    """Callables that read the live state at scrape time."""

    nodes: Callable[[], tuple[int, int]]
    """(online, offline)"""
    rollouts_by_state: Callable[[], dict[str, int]]
    messages: Callable[[], tuple[int, int]]
    """(received, sent)"""
    store_commit_s: Callable[[], float]
    store_rewrites: Callable[[], int]


class _StateCollector(Collector):
    def __init__(self, source: MetricsSource) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        online, offline = self._source.nodes()
        nodes = GaugeMetricFamily("fleet_nodes", "Known nodes by presence.", labels=["state"])
        nodes.add_metric(["online"], online)
        nodes.add_metric(["offline"], offline)
        yield nodes
        rollouts = GaugeMetricFamily("fleet_rollouts", "Rollouts by state.", labels=["state"])
        # Every state, zeros included: a dashboard's series exist before the first rollout.
        counts = {state: 0 for state in get_args(RolloutState)}
        counts.update(self._source.rollouts_by_state())
        for state, count in sorted(counts.items()):
            rollouts.add_metric([state], count)
        yield rollouts
        received, sent = self._source.messages()
        messages = CounterMetricFamily(
            "fleet_hub_messages", "MQTT messages through the hub's client.", labels=["direction"]
        )
        messages.add_metric(["in"], received)
        messages.add_metric(["out"], sent)
        yield messages
        yield GaugeMetricFamily(
            "fleet_store_commit_seconds",
            "Latency of the store's last group commit (temp file, fsync, rename).",
            value=self._source.store_commit_s(),
        )
        yield CounterMetricFamily(
            "fleet_store_rewrites", "Times the store file was rewritten.", value=self._source.store_rewrites()
        )


class HubMetrics:
    """Every metric of one hub, in a registry of its own."""

    def __init__(self, source: MetricsSource) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_StateCollector(source))
        self._step_seconds = Histogram(
            "fleet_step_duration_seconds",
            "Duration of plan steps on nodes, by step type and outcome.",
            ["type", "outcome"],
            buckets=_STEP_BUCKETS,
            registry=self.registry,
        )
        self._rejected = Counter(
            "fleet_commands_rejected", "Commands that agents rejected.", registry=self.registry
        )
        self._started: dict[tuple[str, str, int], float] = {}

    def observe_status(self, status: StepStatus) -> None:
        """Feed one ``StepStatus``: running starts a clock, a final state stops it."""
        key = (status.node, status.command, status.index)
        if status.state == "running":
            if len(self._started) < 100_000:
                self._started[key] = status.ts
            return
        if status.state == "rejected":
            self._rejected.inc()
            return
        started = self._started.pop(key, None)
        if started is not None and status.state in ("succeeded", "failed"):
            self._step_seconds.labels(status.type, status.state).observe(max(0.0, status.ts - started))

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)
