"""Adaptive pace: the pure sizing rules, and the engine growing and shrinking waves with audit entries."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from bus.messages import AdaptivePace, RolloutSpec, Strategy
from bus.pace import first_size, initial_waves, next_pace, planned_waves, projected_waves
from hub.core.engine import Audit, RolloutsLoaded
from tests.unit.hub.test_engine import Fleet, published

NODES = [f"n{i:02d}" for i in range(1, 21)]


def pace(**fields: Any) -> AdaptivePace:
    return AdaptivePace.model_validate(fields)


def test_clean_waves_grow_up_to_the_cap() -> None:
    assert next_pace(pace(), 20, 1, 1, 1, 0).size == 2
    assert next_pace(pace(grow_factor=1.5), 20, 3, 2, 3, 0).size == 5  # ceil(4.5)
    assert next_pace(pace(grow_factor=1.1), 20, 2, 2, 2, 0).size == 3  # always at least one more
    capped = next_pace(pace(max=5), 20, 4, 3, 4, 0)
    assert (capped.size, capped.change) == (5, "grow")
    assert capped.reason == "wave 3 clean (4/4 succeeded): next wave 5 nodes (x2, capped)"
    at_cap = next_pace(pace(max="25%"), 20, 5, 4, 5, 0)
    assert (at_cap.size, at_cap.change) == (5, "max")


def test_failures_shrink_or_hold() -> None:
    shrunk = next_pace(pace(), 20, 8, 4, 7, 1)
    assert (shrunk.size, shrunk.change) == (4, "shrink")
    assert shrunk.reason == "wave 4: 1 of 8 failed: next wave 4 nodes (x0.5)"
    assert next_pace(pace(), 20, 1, 1, 0, 1).size == 1  # never below one node
    held = next_pace(pace(on_failures="hold"), 20, 8, 4, 6, 2)
    assert (held.size, held.change) == (8, "hold")
    assert held.reason == "wave 4: 2 of 8 failed: holding the pace at 8 nodes"


def test_first_wave_and_projection() -> None:
    assert first_size(pace(start="10%"), 20) == 2
    assert first_size(pace(start=5, max=3), 20) == 3
    assert [len(w) for w in projected_waves(NODES, pace())] == [1, 2, 4, 8, 5]
    assert [len(w) for w in projected_waves(NODES, pace(start=2, max=6, grow_factor=3))] == [2, 6, 6, 6]
    assert [len(w) for w in initial_waves(NODES, Strategy(adaptive=pace(start=3)))] == [3] * 6 + [2]
    assert [len(w) for w in initial_waves(NODES[:5], Strategy(waves=[1, "100%"]))] == [1, 4]
    # What plans and previews show: fixed waves, or adaptive ones at their fastest.
    assert [len(w) for w in planned_waves(NODES, Strategy(adaptive=pace()))] == [1, 2, 4, 8, 5]
    assert [len(w) for w in planned_waves(NODES[:5], Strategy(waves=[1, "100%"]))] == [1, 4]
    assert planned_waves([], Strategy(adaptive=pace())) == []


def test_waves_and_adaptive_exclude_each_other() -> None:
    with pytest.raises(ValidationError, match="either waves or adaptive"):
        Strategy.model_validate({"waves": [1], "adaptive": {}})
    spec = RolloutSpec.model_validate(
        {
            "name": "x",
            "targets": "all",
            "plan": [{"type": "script", "name": "a.sh"}],
            "strategy": {"adaptive": {}},
        }
    )
    assert spec.strategy.adaptive == AdaptivePace()
    # A dumped spec (stored records, the HTTP bridge) carries the default waves beside adaptive.
    assert RolloutSpec.model_validate(spec.model_dump(mode="json")) == spec


class LoggedFleet(Fleet):
    def __init__(self) -> None:
        super().__init__()
        self.log: list[Any] = []

    def do(self, event: Any, at: float | None = None) -> list[Any]:
        actions = super().do(event, at)
        self.log += actions
        return actions


def pace_audits(fleet: LoggedFleet) -> list[Audit]:
    return [a for a in fleet.log if isinstance(a, Audit) and a.kind.startswith("pace_")]


def test_engine_grows_after_clean_waves_and_shrinks_after_a_failure() -> None:
    fleet = LoggedFleet()
    nodes = NODES[:12]
    strategy = {"adaptive": {"start": 1, "grow_factor": 2}}
    actions = fleet.create(nodes, strategy=strategy, failure={"max_failed": 1})
    assert list(published(actions)) == ["n01"]
    fleet.succeed("n01")
    assert set(fleet.sent) == {"n01", "n02", "n03"}  # grown to 2
    fleet.succeed("n02", "n03")
    assert set(fleet.sent) == set(nodes[:7])  # grown to 4
    fleet.succeed("n04", "n05", "n06")
    fleet.step("n07", 0, "failed", "exit 1")  # one failure, within max_failed 1
    fleet.snap("n07", "rolled_back", failed_step=0)
    assert fleet.state() == "running"
    assert set(fleet.sent) == set(nodes[:9])  # shrunk to 2 (n08, n09)
    reasons = [(a.kind, a.message) for a in pace_audits(fleet)]
    assert reasons == [
        ("pace_changed", "wave 1 clean (1/1 succeeded): next wave 2 nodes (x2)"),
        ("pace_changed", "wave 2 clean (2/2 succeeded): next wave 4 nodes (x2)"),
        ("pace_changed", "wave 3: 1 of 4 failed: next wave 2 nodes (x0.5)"),
    ]
    assert pace_audits(fleet)[-1].evidence == {
        "wave": 3,
        "change": "shrink",
        "next_size": 2,
        "failed": 1,
        "waves_left": 3,
    }
    summary = fleet.summary()
    assert (summary.wave, summary.waves) == (4, 6)  # 5 nodes left in waves of 2
    fleet.succeed("n08", "n09")
    fleet.succeed("n10", "n11", "n12")
    assert fleet.state() == "succeeded"
    assert fleet.summary().waves == 5
    # The re-split waves are in the record: a restarted hub carries on with them.
    record = fleet.engine.record("r1")
    assert [len(w) for w in record["waves"]] == [1, 2, 4, 2, 3]
    assert record["nodes"]["n12"]["wave"] == 4
    again = Fleet()
    again.do(RolloutsLoaded((record,)))
    assert again.engine.summary("r1").waves == 5


def test_a_failure_beyond_max_failed_rolls_back_instead_of_shrinking() -> None:
    fleet = LoggedFleet()
    fleet.create(NODES[:6], strategy={"adaptive": {"start": 2}}, failure={"max_failed": 0})
    fleet.step("n01", 0, "failed", "exit 1")
    assert fleet.state() == "rolling_back"
    assert pace_audits(fleet) == []
