"""The hub's Prometheus metrics: families read at scrape time, step durations and rejections observed."""

from __future__ import annotations

from typing import Any, get_args

from prometheus_client.parser import text_string_to_metric_families

from bus.messages import RolloutState, StepStatus
from hub.metrics import HubMetrics, MetricsSource


class Source:
    """Live state a test can change between scrapes."""

    def __init__(self) -> None:
        self.online, self.offline = 3, 1
        self.rollouts: dict[str, int] = {"succeeded": 2, "running": 1}
        self.received, self.sent = 40, 12
        self.commit_s, self.rewrites = 0.004, 7

    def source(self) -> MetricsSource:
        return MetricsSource(
            nodes=lambda: (self.online, self.offline),
            rollouts_by_state=lambda: dict(self.rollouts),
            messages=lambda: (self.received, self.sent),
            store_commit_s=lambda: self.commit_s,
            store_rewrites=lambda: self.rewrites,
        )


def scrape(metrics: HubMetrics) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    """family name -> [(sample name, labels, value)]."""
    return {
        family.name: [(s.name, dict(s.labels), s.value) for s in family.samples]
        for family in text_string_to_metric_families(metrics.render().decode())
    }


def value(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    found = [v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items())]
    assert len(found) == 1, (name, labels, samples)
    return found[0]


def status(
    state: str, ts: float, *, index: int = 0, kind: str = "script", node: str = "n1", **extra: Any
) -> StepStatus:
    return StepStatus(
        node=node, command="c1", rollout="r1", index=index, type=kind, state=state, ts=ts, **extra
    )


def test_state_families_are_read_at_scrape_time() -> None:
    live = Source()
    metrics = HubMetrics(live.source())
    families = scrape(metrics)
    assert value(families["fleet_nodes"], "fleet_nodes", state="online") == 3
    assert value(families["fleet_nodes"], "fleet_nodes", state="offline") == 1
    assert value(families["fleet_hub_messages"], "fleet_hub_messages_total", direction="in") == 40
    assert value(families["fleet_hub_messages"], "fleet_hub_messages_total", direction="out") == 12
    assert value(families["fleet_store_commit_seconds"], "fleet_store_commit_seconds") == 0.004
    assert value(families["fleet_store_rewrites"], "fleet_store_rewrites_total") == 7
    live.online, live.offline, live.received = 1, 3, 41
    families = scrape(metrics)
    assert value(families["fleet_nodes"], "fleet_nodes", state="online") == 1
    assert value(families["fleet_nodes"], "fleet_nodes", state="offline") == 3
    assert value(families["fleet_hub_messages"], "fleet_hub_messages_total", direction="in") == 41


def test_every_rollout_state_has_a_series_zeros_included() -> None:
    families = scrape(HubMetrics(Source().source()))
    rollouts = families["fleet_rollouts"]
    assert {labels["state"] for _n, labels, _v in rollouts} == set(get_args(RolloutState))
    assert value(rollouts, "fleet_rollouts", state="succeeded") == 2
    assert value(rollouts, "fleet_rollouts", state="running") == 1
    assert value(rollouts, "fleet_rollouts", state="rolled_back") == 0


def test_step_durations_by_type_and_outcome() -> None:
    metrics = HubMetrics(Source().source())
    metrics.observe_status(status("running", 100.0))
    metrics.observe_status(status("succeeded", 102.5))
    metrics.observe_status(status("running", 100.0, index=1, kind="health"))
    metrics.observe_status(status("failed", 100.2, index=1, kind="health", detail="HTTP 500"))
    # A final report without its start (the hub came up mid-step) is not a duration.
    metrics.observe_status(status("succeeded", 300.0, index=2, kind="download"))
    # An undo report is not a step's duration either.
    metrics.observe_status(status("rolled_back", 101.0, index=0))
    steps = scrape(metrics)["fleet_step_duration_seconds"]
    name = "fleet_step_duration_seconds"
    assert value(steps, f"{name}_count", type="script", outcome="succeeded") == 1
    assert value(steps, f"{name}_sum", type="script", outcome="succeeded") == 2.5
    assert value(steps, f"{name}_count", type="health", outcome="failed") == 1
    assert value(steps, f"{name}_bucket", type="health", outcome="failed", le="0.25") == 1
    assert value(steps, f"{name}_bucket", type="script", outcome="succeeded", le="2.5") == 1
    assert value(steps, f"{name}_bucket", type="script", outcome="succeeded", le="1.0") == 0
    assert not [s for s in steps if s[1].get("type") == "download"]


def test_rejected_commands_are_counted() -> None:
    metrics = HubMetrics(Source().source())
    before = scrape(metrics)["fleet_commands_rejected"]
    assert value(before, "fleet_commands_rejected_total") == 0
    for node in ("n1", "n2"):
        metrics.observe_status(status("rejected", 5.0, index=-1, kind="command", node=node, detail="bad sig"))
    metrics.observe_status(status("succeeded", 6.0))
    after = scrape(metrics)["fleet_commands_rejected"]
    assert value(after, "fleet_commands_rejected_total") == 2


def test_each_hub_has_its_own_registry() -> None:
    first, second = HubMetrics(Source().source()), HubMetrics(Source().source())
    first.observe_status(status("rejected", 1.0, index=-1, kind="command"))
    assert value(scrape(first)["fleet_commands_rejected"], "fleet_commands_rejected_total") == 1
    assert value(scrape(second)["fleet_commands_rejected"], "fleet_commands_rejected_total") == 0


def test_step_types_outside_the_contract_share_one_label_value() -> None:
    """Issue 16: a node chooses the ``type`` it reports; the series count must not grow with it."""
    metrics = HubMetrics(Source().source())
    for i in range(500):
        metrics.observe_status(status("running", 1.0, index=i, kind=f"made-up-{i}"))
        metrics.observe_status(status("succeeded", 2.0, index=i, kind=f"made-up-{i}"))
    metrics.observe_status(status("running", 1.0, index=999))
    metrics.observe_status(status("succeeded", 2.0, index=999))
    text = metrics.render().decode()
    assert "made-up" not in text
    samples = scrape(metrics)["fleet_step_duration_seconds"]
    assert value(samples, "fleet_step_duration_seconds_count", type="other", outcome="succeeded") == 500
    assert value(samples, "fleet_step_duration_seconds_count", type="script", outcome="succeeded") == 1


async def test_render_async_gives_the_same_text_off_the_loop() -> None:
    metrics = HubMetrics(Source().source())
    metrics.observe_status(status("running", 1.0))
    metrics.observe_status(status("succeeded", 2.0))
    assert await metrics.render_async() == metrics.render()
