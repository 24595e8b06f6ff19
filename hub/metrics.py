"""The hub's Prometheus metrics (``GET /metrics``).

Gauges that mirror state (nodes online, rollouts by state, messages in/out,
store latency) are read at scrape time from the running service, so nothing on
the hot path updates them. Step durations and rejected commands are observed
from the ``StepStatus`` stream through ``observe_status``.

A node's reports are attacker-controlled input: the hub feeds only reports of
commands it issued, label values come from a closed set (``STEP_TYPES``, else
``other``), and the clocks of running steps are bounded, so neither the series
count nor the scrape can grow with what nodes send. ``render`` is blocking
(CPU): the HTTP bridge calls it through asyncio.to_thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, get_args, get_origin

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from bus.messages import RolloutState, Step, StepStatus

__all__ = ["STEP_TYPES", "HubMetrics", "MetricsSource"]


def _step_types() -> frozenset[str]:
    union = get_args(Step)[0] if get_origin(Step) is Annotated else Step
    return frozenset(str(model.model_fields["type"].default) for model in get_args(union))


#: The ``type`` label's values: the contract's step types; anything else is "other".
STEP_TYPES = _step_types()
#: Steps timed at once (running, not yet finished); more are not timed.
_MAX_RUNNING = 100_000

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
        self._state = _StateCollector(source)
        #: What observe_status feeds (thread-safe), apart from the live state.
        self._observed = CollectorRegistry()
        self._step_seconds = Histogram(
            "fleet_step_duration_seconds",
            "Duration of plan steps on nodes, by step type and outcome.",
            ["type", "outcome"],
            buckets=_STEP_BUCKETS,
            registry=self._observed,
        )
        self._rejected = Counter(
            "fleet_commands_rejected", "Commands that agents rejected.", registry=self._observed
        )
        self.registry = CollectorRegistry()
        self.registry.register(self._state)
        self.registry.register(self._step_seconds)
        self.registry.register(self._rejected)
        self._started: dict[tuple[str, str, int], float] = {}
        self._step_children: dict[tuple[str, str], Histogram] = {}

    def observe_status(self, status: StepStatus) -> None:
        """Feed one ``StepStatus``: running starts a clock, a final state stops it."""
        key = (status.node, status.command, status.index)
        if status.state == "running":
            if len(self._started) < _MAX_RUNNING:
                self._started[key] = status.ts
            return
        if status.state == "rejected":
            self._rejected.inc()
            return
        started = self._started.pop(key, None)
        if started is not None and status.state in ("succeeded", "failed"):
            kind = status.type if status.type in STEP_TYPES else "other"
            pair = (kind, status.state)
            child = self._step_children.get(pair)
            if child is None:  # (labels() costs more than the observation: once per pair)
                child = self._step_children[pair] = self._step_seconds.labels(*pair)
            child.observe(max(0.0, status.ts - started))

    def render(self) -> bytes:
        """The Prometheus text exposition, all on the caller's thread (tests, tools)."""
        return generate_latest(self.registry)

    async def render_async(self) -> bytes:
        """The exposition: live state read on the event loop (cheap), the text built in a thread.

        The state collector reads the service's dicts, which only the loop may
        touch; the histograms are thread-safe. A scrape never stalls the hub.
        """
        frozen = _Frozen(list(self._state.collect()), self._observed)
        return await asyncio.to_thread(generate_latest, frozen)


class _Frozen:
    """What ``generate_latest`` reads: state metrics read earlier, then the observed ones."""

    def __init__(self, state: list[Metric], observed: CollectorRegistry) -> None:
        self._state = state
        self._observed = observed

    def collect(self) -> Iterator[Metric]:
        yield from self._state
        yield from self._observed.collect()
