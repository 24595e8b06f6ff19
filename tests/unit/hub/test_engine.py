"""The rollout engine: event lists in, action lists out. No network, no clock."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Sequence
from typing import Any

import pytest

from bus.errors import Conflict, InvalidInput, NotFound
from bus.messages import Command, JobSnapshot, RolloutSpec, StepState, StepStatus
from hub.core.engine import (
    AbortRequested,
    Action,
    Audit,
    BrokerChanged,
    ClearCommand,
    PauseRequested,
    PresenceChanged,
    PublishCommand,
    ResumeRequested,
    RollbackRequested,
    RolloutChanged,
    RolloutCreated,
    RolloutEngine,
    RolloutsLoaded,
    SnapshotReported,
    StepReported,
    Tick,
    check_record,
)

T0 = 1_700_000_000.0
PLAN: list[dict[str, Any]] = [
    {"type": "script", "name": "install_update.sh", "rollback": "rollback.sh"},
    {"type": "health", "check": "command", "target": "health.sh", "timeout_s": 5},
]


def make_spec(nodes: Sequence[str], **fields: Any) -> RolloutSpec:
    return RolloutSpec.model_validate({"name": "update", "targets": list(nodes), "plan": PLAN, **fields})


class Fleet:
    """An engine plus the commands it sent, so tests read like the protocol."""

    def __init__(self, grace: float = 5.0) -> None:
        counter = itertools.count(1)
        self.engine = RolloutEngine(new_id=lambda: f"c{next(counter)}", resume_grace_s=grace, strict=True)
        self.sent: dict[str, list[Command]] = {}
        self.history: list[Action] = []
        self.now = T0

    def do(self, event: Any, at: float | None = None) -> list[Action]:
        if at is not None:
            self.now = at
        actions = self.engine.handle(event, self.now)
        self.history += actions
        for action in actions:
            if isinstance(action, PublishCommand):
                self.sent.setdefault(action.node, []).append(action.command)
        return actions

    def create(
        self, nodes: Sequence[str], rid: str = "r1", online: Iterable[str] | None = None, **fields: Any
    ) -> list[Action]:
        spec = make_spec(nodes, **fields)
        up = frozenset(nodes if online is None else online)
        return self.do(RolloutCreated(rid, spec, tuple(nodes), up))

    def last(self, node: str) -> Command:
        return self.sent[node][-1]

    def snap(self, node: str, phase: str, failed_step: int | None = None, detail: str = "") -> list[Action]:
        cmd = self.last(node)
        steps = []
        if cmd.action == "apply":
            for i, step in enumerate(cmd.plan):
                state = "succeeded"
                if failed_step is not None and i == failed_step:
                    state = "failed"
                elif failed_step is not None and i > failed_step:
                    state = "pending"
                steps.append(
                    StepState(
                        index=i, type=step.type, state=state, detail="exit 1" if state == "failed" else ""
                    )
                )
        snapshot = JobSnapshot(
            node=node,
            id=cmd.id,
            rollout=cmd.rollout,
            action=cmd.action,
            phase=phase,
            steps=steps,
            detail=detail,
        )
        return self.do(SnapshotReported(node, snapshot))

    def step(
        self, node: str, index: int, state: str, detail: str = "", type_: str = "script"
    ) -> list[Action]:
        cmd = self.last(node)
        status = StepStatus.model_validate(
            {
                "node": node,
                "command": cmd.id,
                "rollout": cmd.rollout,
                "index": index,
                "type": type_,
                "state": state,
                "ts": self.now,
                "detail": detail,
            }
        )
        return self.do(StepReported(node, status))

    def succeed(self, *nodes: str) -> None:
        for node in nodes:
            self.step(node, 0, "running")
            self.snap(node, "succeeded")

    def summary(self, rid: str = "r1") -> Any:
        return self.engine.summary(rid)

    def state(self, rid: str = "r1") -> str:
        return self.engine.state(rid)

    def phases(self, rid: str = "r1") -> dict[str, str]:
        return {name: node.phase for name, node in self.summary(rid).nodes.items()}


def published(actions: list[Action]) -> dict[str, str]:
    """node -> action of every command published."""
    return {a.node: a.command.action for a in actions if isinstance(a, PublishCommand)}


def cleared(actions: list[Action]) -> list[str]:
    return [a.node for a in actions if isinstance(a, ClearCommand)]


def audits(actions: list[Action], kind: str | None = None) -> list[Audit]:
    return [a for a in actions if isinstance(a, Audit) and (kind is None or a.kind == kind)]


# ---------------------------------------------------------------------------- creation


def test_create_sends_a_ready_apply_to_every_target() -> None:
    fleet = Fleet()
    actions = fleet.create(["n1", "n2", "n3"], step_timeout_s=42, expires_after_s=600)
    assert published(actions) == {"n1": "apply", "n2": "apply", "n3": "apply"}
    cmd = fleet.last("n2")
    assert (cmd.node, cmd.rollout, cmd.issued_at, cmd.expires_at) == ("n2", "r1", T0, T0 + 600)
    assert [step.timeout_s for step in cmd.plan] == [42, 5]  # only the missing timeout is filled
    assert len({fleet.last(n).id for n in ("n1", "n2", "n3")}) == 3
    assert fleet.state() == "running"
    assert RolloutChanged("r1") in actions
    assert audits(actions, "created")[0].message.startswith("rollout 'update' created: 3 nodes in 1 waves")
    summary = fleet.summary()
    assert summary.counts.running == 3
    assert (summary.wave, summary.waves) == (1, 1)


def test_every_node_succeeding_clears_its_command_and_the_rollout_succeeds() -> None:
    fleet = Fleet()
    fleet.create(["n1", "n2"])
    fleet.step("n1", 0, "running")
    assert fleet.phases()["n1"] == "applying"
    assert fleet.summary().nodes["n1"].step == 0
    actions = fleet.snap("n1", "succeeded")
    assert cleared(actions) == ["n1"]
    assert fleet.state() == "running"
    actions = fleet.snap("n2", "succeeded")
    assert cleared(actions) == ["n2"]
    assert fleet.state() == "succeeded"
    assert audits(actions, "succeeded")[0].message == "succeeded on 2 nodes"
    assert fleet.summary().counts.succeeded == 2
    # Folding the same retained snapshot again changes nothing and clears nothing twice.
    assert fleet.snap("n2", "succeeded") == []


def test_busy_targets_are_refused_with_their_names() -> None:
    fleet = Fleet()
    fleet.create(["n1", "n2"])
    with pytest.raises(Conflict) as caught:
        fleet.create(["n2", "n3"], rid="r2")
    assert caught.value.nodes == ["n2"]
    assert not fleet.engine.has("r2")
    fleet.succeed("n1", "n2")
    fleet.create(["n2", "n3"], rid="r2")  # a finished rollout no longer holds its nodes
    assert fleet.state("r2") == "running"


def test_requests_that_the_state_does_not_allow() -> None:
    fleet = Fleet()
    with pytest.raises(NotFound):
        fleet.do(AbortRequested("nope"))
    fleet.create(["n1"])
    with pytest.raises(Conflict, match="abort it"):
        fleet.do(RollbackRequested("r1"))
    assert fleet.do(ResumeRequested("r1")) == []  # resuming a running rollout is a no-op
    fleet.succeed("n1")
    with pytest.raises(Conflict, match="only a paused rollout"):
        fleet.do(ResumeRequested("r1"))
    with pytest.raises(Conflict, match="succeeded already"):
        fleet.do(AbortRequested("r1"))
    with pytest.raises(Conflict):
        fleet.do(PauseRequested("r1"))


# ------------------------------------------------------------------------------- waves


def test_waves_with_counts_and_percents_and_a_repeating_last_entry() -> None:
    fleet = Fleet()
    nodes = [f"n{i}" for i in range(1, 11)]
    actions = fleet.create(nodes, strategy={"waves": [1, "30%"]})
    assert list(published(actions)) == ["n1"]
    assert (fleet.summary().wave, fleet.summary().waves) == (1, 4)
    fleet.succeed("n1")
    assert list(fleet.sent) == ["n1", "n2", "n3", "n4"]
    fleet.succeed("n2", "n3")
    assert len(fleet.sent) == 4  # the wave is not done until n4 is
    fleet.succeed("n4")
    assert list(fleet.sent)[4:] == ["n5", "n6", "n7"]
    fleet.succeed("n5", "n6", "n7")
    assert list(fleet.sent)[7:] == ["n8", "n9", "n10"]
    assert fleet.summary().wave == 4
    fleet.succeed("n8", "n9", "n10")
    assert fleet.state() == "succeeded"


def test_max_parallel_dispatches_a_wave_in_chunks() -> None:
    fleet = Fleet()
    actions = fleet.create(["a", "b", "c", "d", "e"], strategy={"max_parallel": 2})
    assert list(published(actions)) == ["a", "b"]
    actions = fleet.snap("a", "succeeded")
    assert list(published(actions)) == ["c"]
    fleet.succeed("b", "c")
    assert list(fleet.sent) == ["a", "b", "c", "d", "e"]
    assert fleet.summary().counts.running == 2


def test_clean_soak_starts_the_next_wave_only_after_soak_s() -> None:
    fleet = Fleet()
    fleet.create(["n1", "n2", "n3"], strategy={"waves": [1], "soak_s": 30})
    fleet.succeed("n1")
    assert list(fleet.sent) == ["n1"]
    assert fleet.engine.next_deadline() == T0 + 30
    assert published(fleet.do(Tick(), at=T0 + 29.9)) == {}
    actions = fleet.do(Tick(), at=T0 + 30)
    assert published(actions) == {"n2": "apply"}
    assert audits(actions, "wave_started")[0].message == "wave 2 of 3 started (1 nodes)"


def test_a_node_going_offline_during_soak_is_lost_then_a_failure_after_its_grace() -> None:
    fleet = Fleet()
    fleet.create(["n1", "n2"], strategy={"waves": [1], "soak_s": 30}, offline_grace_s=20)
    fleet.succeed("n1")
    actions = fleet.do(PresenceChanged("n1", False), at=T0 + 10)
    assert fleet.phases()["n1"] == "lost"
    assert fleet.summary().counts.lost == 1
    assert fleet.state() == "running"
    assert published(actions) == {}
    assert fleet.engine.next_deadline() == T0 + 30
    actions = fleet.do(Tick(), at=T0 + 30)
    assert fleet.phases()["n1"] == "offline"  # rolling back, but it cannot answer yet
    assert fleet.summary().nodes["n1"].detail == (
        "went offline in its wave: offline since 22:13:30 UTC, not back within offline_grace_s (20 s)"
    )
    assert fleet.state() == "rolling_back"
    assert published(actions) == {"n1": "rollback"}  # it applied: the retained rollback waits for it
    assert "n2" not in fleet.sent
    started = audits(actions, "rollback_started")[0].message
    assert started.startswith("rollback started: n1 went offline in its wave")


# ----------------------------------------------------------------------------- failures


def test_a_failed_step_starts_a_coordinated_rollback() -> None:
    fleet = Fleet()
    fleet.create(["n1", "n2", "n3", "n4"], strategy={"waves": [3]})
    fleet.succeed("n1")
    fleet.step("n2", 0, "running")
    fleet.step("n3", 0, "running")
    actions = fleet.step("n3", 1, "failed", "exit 1", type_="health")
    # Stop new waves, abort the running, roll back the applied; n3 restores itself.
    assert published(actions) == {"n1": "rollback", "n2": "abort"}
    assert fleet.state() == "rolling_back"
    started = audits(actions, "rollback_started")[0]
    assert started.message == "rollback started: n3 failed step 2 (health): exit 1"
    assert started.evidence["failures"] == {"n3": "failed step 2 (health): exit 1"}
    assert fleet.summary().detail == started.message
    assert fleet.phases() == {"n1": "rolling_back", "n2": "rolling_back", "n3": "failed", "n4": "pending"}
    assert "n4" not in fleet.sent
    rollback = fleet.last("n1")
    assert (rollback.rollout, rollback.plan) == ("r1", [])
    # The failed node reports its own restore; its snapshot still shows the failed step.
    fleet.snap("n3", "rolling_back", failed_step=1)
    actions = fleet.snap("n3", "rolled_back", failed_step=1)
    assert cleared(actions) == ["n3"]
    fleet.snap("n1", "rolled_back")
    actions = fleet.snap("n2", "rolled_back")
    assert fleet.state() == "rolled_back"
    message = audits(actions, "rolled_back")[0].message
    assert message == "rolled back: every touched node restored and verified (3)"
    counts = fleet.summary().counts
    # n3 failed and stays counted failed once restored (and is counted restored too);
    # n4 never started in a finished rollout: not_started, never pending.
    assert (counts.failed, counts.rolled_back, counts.pending, counts.not_started, counts.running) == (
        1,
        3,
        0,
        1,
        0,
    )
    assert fleet.phases()["n4"] == "not_started"


def test_a_reconnecting_node_gets_its_open_command_again_with_the_same_id() -> None:
    # A broker restarted without persistence may have lost the retained command the
    # node waits for; the node's new session is the hub's cue to publish it again.
    fleet = Fleet()
    fleet.create(["n1", "n2"])
    fleet.succeed("n1")
    fleet.step("n2", 0, "failed", "exit 1", type_="script")
    rollback = fleet.last("n1")
    assert rollback.action == "rollback"
    actions = fleet.do(PresenceChanged("n1", True))
    again = [a.command for a in actions if isinstance(a, PublishCommand)]
    assert [(c.id, c.action) for c in again] == [(rollback.id, "rollback")]
    fleet.snap("n1", "rolled_back")
    # Once the node is done, a reconnect re-sends nothing.
    assert not [a for a in fleet.do(PresenceChanged("n1", True)) if isinstance(a, PublishCommand)]


def test_a_node_that_cannot_be_restored_ends_in_rollback_failed_naming_it() -> None:
    fleet = Fleet()
    fleet.create(["n1", "n2", "n3"])
    fleet.succeed("n1", "n2")
    fleet.step("n3", 1, "failed", "exit 1", type_="health")
    fleet.snap("n3", "rolled_back", failed_step=1)
    fleet.snap("n1", "rolled_back")
    actions = fleet.snap("n2", "failed", detail="rollback.sh exited 3")
    assert fleet.state() == "rollback_failed"
    detail = fleet.summary().detail
    assert detail.startswith("not restored: n2 (rollback failed: rollback.sh exited 3)")
    assert "n1" not in detail
    assert "n3" not in detail
    assert cleared(actions) == ["n2"]
    assert audits(actions, "rollback_failed")[0].evidence["not_restored"].keys() == {"n2"}


def test_a_failed_node_that_cannot_restore_itself_is_not_restored() -> None:
    fleet = Fleet()
    fleet.create(["n1", "n2"])
    fleet.succeed("n1")
    fleet.step("n2", 0, "failed", "exit 2")
    fleet.snap("n1", "rolled_back")
    assert fleet.state() == "rolling_back"
    fleet.snap("n2", "failed", failed_step=0, detail="undo of step 0 failed")
    assert fleet.state() == "rollback_failed"
    assert (
        "n2 (failed step 1 (script): exit 2; not restored: undo of step 0 failed)" in fleet.summary().detail
    )


def test_max_failed_tolerates_failures_then_rolls_back() -> None:
    fleet = Fleet()
    fleet.create(["n1", "n2", "n3", "n4"], strategy={"waves": [2]}, failure={"max_failed": 1})
    fleet.succeed("n1")
    actions = fleet.step("n2", 0, "failed", "boom")
    assert fleet.state() == "running"
    assert audits(actions, "node_failed")[0].message == "n2 failed step 1 (script): boom"
    fleet.snap("n2", "rolled_back", failed_step=0)
    assert list(fleet.sent) == ["n1", "n2", "n3", "n4"]  # wave 1 is done with one tolerated failure
    fleet.succeed("n3")
    actions = fleet.step("n4", 0, "failed", "boom")
    assert fleet.state() == "rolling_back"
    assert published(actions) == {"n1": "rollback", "n3": "rollback"}
    assert "(2 failed, max_failed 1)" in audits(actions, "rollback_started")[0].message


def test_failures_within_max_failed_still_succeed_with_a_note() -> None:
    fleet = Fleet()
    fleet.create(["n1", "n2"], failure={"max_failed": 1})
    fleet.succeed("n1")
    fleet.step("n2", 0, "failed", "boom")
    fleet.snap("n2", "rolled_back", failed_step=0)
    assert fleet.state() == "succeeded"
    assert fleet.summary().detail == "succeeded with 1 failed nodes (max_failed 1)"


def test_halt_stops_new_waves_and_rolls_nothing_back() -> None:
    fleet = Fleet()
    fleet.create(["n1", "n2", "n3", "n4"], strategy={"waves": [3]}, failure={"on_failure": "halt"})
    fleet.succeed("n1")
    fleet.step("n2", 0, "running")
    actions = fleet.step("n3", 0, "failed", "exit 1")
    assert fleet.state() == "halted"
    assert published(actions) == {}
    assert fleet.summary().detail == "halted: n3 failed step 1 (script): exit 1"
    # The running node finishes; nothing new starts.
    fleet.snap("n2", "succeeded")
    assert fleet.phases() == {"n1": "succeeded", "n2": "succeeded", "n3": "failed", "n4": "not_started"}
    assert "n4" not in fleet.sent
    # ... and a halted rollout can be rolled back on request.
    actions = fleet.do(RollbackRequested("r1"))
    assert published(actions) == {"n1": "rollback", "n2": "rollback"}


def test_a_rejected_command_is_a_failure_with_the_agents_reason() -> None:
    fleet = Fleet()
    fleet.create(["n1", "n2"])
    fleet.succeed("n1")
    actions = fleet.step("n2", -1, "rejected", "command expired", type_="command")
    assert fleet.phases()["n2"] == "rejected"
    assert fleet.summary().nodes["n2"].detail == "rejected the command: command expired"
    assert cleared(actions) == ["n2"]
    assert published(actions) == {"n1": "rollback"}  # n2 changed nothing: nothing to undo there
    fleet.snap("n1", "rolled_back")
    assert fleet.state() == "rolled_back"


def test_node_timeout_times_the_node_out_and_aborts_it() -> None:
    fleet = Fleet()
    fleet.create(["n1", "n2"], node_timeout_s=60)
    fleet.succeed("n1")
    fleet.step("n2", 0, "running")
    assert fleet.engine.next_deadline() == T0 + 60
    assert fleet.do(Tick(), at=T0 + 59) == []
    actions = fleet.do(Tick(), at=T0 + 60)
    assert published(actions) == {"n2": "abort", "n1": "rollback"}
    assert fleet.phases()["n2"] == "timed_out"
    assert "n2 timed out: no final report within 60 s" in fleet.summary().detail
    fleet.snap("n2", "rolled_back")
    fleet.snap("n1", "rolled_back")
    assert fleet.state() == "rolled_back"


def test_a_node_offline_mid_job_past_its_grace_is_a_failure() -> None:
    fleet = Fleet()
    fleet.create(["n1", "n2"])  # offline_grace_s unset: the engine's default (25 s here)
    fleet.step("n1", 0, "running")
    actions = fleet.do(PresenceChanged("n1", False))
    assert fleet.phases()["n1"] == "lost"
    assert published(actions) == {}
    assert audits(actions, "node_lost")[0].message == (
        "n1 lost: offline since 22:13:20 UTC; a failure after 25 s"
    )
    assert fleet.do(Tick(), at=T0 + 24.9) == []
    actions = fleet.do(Tick(), at=T0 + 25)
    assert fleet.phases()["n1"] == "offline"
    assert published(actions) == {"n1": "abort", "n2": "abort"}
    assert audits(actions, "node_failed")[0].message == (
        "n1 went offline mid-job: offline since 22:13:20 UTC, not back within offline_grace_s (25 s)"
    )


def test_an_offline_node_keeps_its_rollback_and_is_named_when_not_restored_in_time() -> None:
    fleet = Fleet()
    fleet.create(["n1", "n2"], node_timeout_s=60, strategy={"waves": [1]})
    fleet.succeed("n1")
    fleet.do(PresenceChanged("n1", False), at=T0 + 1)  # its wave is done and soaked: not even lost
    assert fleet.state() == "running"
    actions = fleet.step("n2", 0, "failed", "exit 1")
    assert published(actions) == {"n1": "rollback"}
    assert fleet.phases()["n1"] == "offline"
    fleet.snap("n2", "rolled_back", failed_step=0)
    actions = fleet.do(Tick(), at=T0 + 61)
    assert cleared(actions) == []  # the retained rollback still waits for n1
    assert fleet.state() == "rollback_failed"
    assert fleet.summary().detail.startswith(
        "not restored: n1 (not restored: no report within 60 s of the rollback)"
    )
    # It comes back later and restores: the record is amended (audit), its command cleared.
    fleet.do(PresenceChanged("n1", True), at=T0 + 100)
    actions = fleet.snap("n1", "rolled_back")
    assert fleet.phases()["n1"] == "rolled_back"
    assert cleared(actions) == ["n1"]
    assert fleet.state() == "rolled_back"
    assert audits(actions, "late_restore")[0].message == (
        "n1 restored after all (verified); record amended: every touched node is restored now"
    )


# ------------------------------------------------------------------- operator requests


def test_abort_of_a_running_rollout_restores_every_touched_node() -> None:
    fleet = Fleet()
    fleet.create(["n1", "n2", "n3"], strategy={"waves": [2]})
    fleet.succeed("n1")
    fleet.step("n2", 0, "running")
    actions = fleet.do(AbortRequested("r1"))
    assert fleet.state() == "aborting"
    assert published(actions) == {"n1": "rollback", "n2": "abort"}
    assert fleet.do(AbortRequested("r1")) == []  # a second abort changes nothing
    fleet.snap("n1", "rolled_back")
    actions = fleet.snap("n2", "rolled_back")
    assert fleet.state() == "rolled_back"
    assert fleet.phases() == {"n1": "rolled_back", "n2": "rolled_back", "n3": "not_started"}


def test_abort_where_a_node_cannot_be_restored_ends_aborted_naming_it() -> None:
    fleet = Fleet()
    fleet.create(["n1", "n2"])
    fleet.succeed("n1")
    fleet.do(AbortRequested("r1"))
    fleet.snap("n1", "failed", detail="rollback.sh exited 1")
    fleet.snap("n2", "rolled_back")
    assert fleet.state() == "aborted"
    assert fleet.summary().detail == "not restored: n1 (rollback failed: rollback.sh exited 1)"


def test_abort_before_anything_started_withdraws_the_queued_commands() -> None:
    fleet = Fleet()
    actions = fleet.create(["n1", "n2"], online=[], require_online=False)
    assert published(actions) == {"n1": "apply", "n2": "apply"}
    assert fleet.phases() == {"n1": "pending", "n2": "pending"}
    actions = fleet.do(AbortRequested("r1"))
    assert sorted(cleared(actions)) == ["n1", "n2"]
    assert published(actions) == {}
    assert fleet.state() == "aborted"
    assert fleet.summary().detail == "aborted before any node started"


def test_a_withdrawn_apply_that_started_anyway_is_aborted() -> None:
    fleet = Fleet()
    fleet.create(["n1"], online=[], require_online=False)
    fleet.do(AbortRequested("r1"))
    assert fleet.state() == "aborted"
    actions = fleet.step("n1", 0, "running")  # it fetched the command before the clear reached it
    assert published(actions) == {"n1": "abort"}
    assert audits(actions, "late_start")
    fleet.snap("n1", "rolled_back")
    assert fleet.phases()["n1"] == "rolled_back"


def test_pause_holds_new_commands_and_resume_continues() -> None:
    fleet = Fleet()
    fleet.create(["n1", "n2", "n3"], strategy={"waves": [1]})
    fleet.step("n1", 0, "running")
    fleet.do(PauseRequested("r1"))
    assert fleet.state() == "paused"
    fleet.do(PauseRequested("r1"))  # idempotent
    fleet.snap("n1", "succeeded")  # the running node continues
    assert fleet.phases()["n1"] == "succeeded"
    assert list(fleet.sent) == ["n1"]
    actions = fleet.do(ResumeRequested("r1"))
    assert fleet.state() == "running"
    assert published(actions) == {"n2": "apply"}


def test_abort_of_a_paused_rollout() -> None:
    fleet = Fleet()
    fleet.create(["n1", "n2"], strategy={"waves": [1]})
    fleet.step("n1", 0, "running")
    fleet.do(PauseRequested("r1"))
    fleet.snap("n1", "succeeded")
    assert fleet.state() == "paused"
    actions = fleet.do(AbortRequested("r1"))
    assert published(actions) == {"n1": "rollback"}
    fleet.snap("n1", "rolled_back")
    assert fleet.state() == "rolled_back"
    assert "n2" not in fleet.sent


def test_a_failure_while_paused_still_rolls_back() -> None:
    fleet = Fleet()
    fleet.create(["n1", "n2"])
    fleet.succeed("n1")
    fleet.do(PauseRequested("r1"))
    actions = fleet.step("n2", 0, "failed", "exit 1")
    assert fleet.state() == "rolling_back"
    assert published(actions) == {"n1": "rollback"}


def test_rollback_of_a_succeeded_rollout() -> None:
    fleet = Fleet()
    fleet.create(["n1", "n2"])
    fleet.succeed("n1", "n2")
    actions = fleet.do(RollbackRequested("r1"))
    assert fleet.state() == "rolling_back"
    assert published(actions) == {"n1": "rollback", "n2": "rollback"}
    assert audits(actions, "rollback_started")[0].message == "rollback requested"
    fleet.snap("n1", "rolled_back")
    fleet.snap("n2", "rolled_back")
    assert fleet.state() == "rolled_back"
    with pytest.raises(Conflict, match="rolled back already"):
        fleet.do(RollbackRequested("r1"))


def test_rollback_request_retries_the_nodes_a_failed_rollback_left() -> None:
    fleet = Fleet()
    fleet.create(["n1", "n2"])
    fleet.succeed("n1", "n2")
    fleet.do(RollbackRequested("r1"))
    fleet.snap("n1", "rolled_back")
    fleet.snap("n2", "failed", detail="disk full")
    assert fleet.state() == "rollback_failed"
    first = fleet.last("n2")
    actions = fleet.do(RollbackRequested("r1"))
    assert published(actions) == {"n2": "rollback"}
    assert fleet.last("n2").id != first.id
    fleet.snap("n2", "rolled_back")
    assert fleet.state() == "rolled_back"


# ------------------------------------------------------------ offline targets and expiry


def test_a_queued_offline_node_that_never_starts_expires() -> None:
    fleet = Fleet()
    fleet.create(
        ["n1", "n2"], online=["n1"], require_online=False, expires_after_s=100, failure={"max_failed": 1}
    )
    assert fleet.phases() == {"n1": "applying", "n2": "pending"}
    assert fleet.summary().nodes["n2"].detail == "queued: node offline"
    fleet.succeed("n1")
    assert fleet.state() == "running"  # the wave waits for the queued node
    assert fleet.engine.next_deadline() == T0 + 100
    actions = fleet.do(Tick(), at=T0 + 100)
    assert fleet.phases()["n2"] == "timed_out"
    assert cleared(actions) == ["n2"]
    assert audits(actions, "node_failed")[0].message == "n2 did not start before its command expired"
    assert fleet.state() == "succeeded"


def test_a_queued_node_coming_online_starts_its_node_timeout() -> None:
    fleet = Fleet()
    fleet.create(["n1"], online=[], require_online=False, node_timeout_s=60, expires_after_s=1000)
    fleet.do(PresenceChanged("n1", True), at=T0 + 300)
    assert fleet.phases()["n1"] == "applying"
    assert fleet.engine.next_deadline() == T0 + 360
    fleet.snap("n1", "succeeded")
    assert fleet.state() == "succeeded"


# ----------------------------------------------------------------- commands on the wire


def test_issued_at_strictly_increases_per_node() -> None:
    fleet = Fleet()
    fleet.create(["n1"])
    fleet.do(AbortRequested("r1"))  # same `now`: the abort must still be later
    apply, abort = fleet.sent["n1"]
    assert abort.issued_at > apply.issued_at
    fleet.snap("n1", "rolled_back")
    fleet.do(
        RolloutCreated("r2", make_spec(["n1"]), ("n1",), frozenset({"n1"})), at=T0 - 50
    )  # clock went back
    assert fleet.last("n1").issued_at > abort.issued_at
    assert fleet.last("n1").expires_at > fleet.last("n1").issued_at


def test_a_command_is_cleared_only_while_it_is_the_nodes_latest() -> None:
    fleet = Fleet()
    fleet.create(["n1", "n2"], node_timeout_s=60, strategy={"waves": [1]})
    fleet.succeed("n1")
    fleet.do(PresenceChanged("n1", False), at=T0 + 1)
    fleet.step("n2", 0, "failed", "exit 1")
    fleet.snap("n2", "rolled_back", failed_step=0)
    fleet.do(Tick(), at=T0 + 61)  # n1 not restored in time: its rollback stays retained
    assert fleet.state() == "rollback_failed"
    r1_rollback = fleet.last("n1")
    fleet.do(RolloutCreated("r2", make_spec(["n1"]), ("n1",), frozenset({"n1"})), at=T0 + 70)
    assert fleet.last("n1").rollout == "r2"
    # A late report for the old rollout's command must not clear r2's retained apply.
    snapshot = JobSnapshot(node="n1", id=r1_rollback.id, rollout="r1", action="rollback", phase="rolled_back")
    actions = fleet.do(SnapshotReported("n1", snapshot))
    assert fleet.phases("r1")["n1"] == "rolled_back"
    assert cleared(actions) == []
    assert fleet.engine.last_command("n1") == fleet.last("n1").id


def test_reports_of_unknown_or_older_commands_are_ignored() -> None:
    fleet = Fleet()
    fleet.create(["n1"])
    apply = fleet.last("n1")
    fleet.do(AbortRequested("r1"))
    stale = JobSnapshot(node="n1", id=apply.id, rollout="r1", action="apply", phase="succeeded")
    assert fleet.do(SnapshotReported("n1", stale)) == []
    other = JobSnapshot(node="n1", id="zzz", rollout="r1", action="apply", phase="failed")
    assert fleet.do(SnapshotReported("n1", other)) == []
    unknown = JobSnapshot(node="n1", id="zzz", rollout="r9", action="apply", phase="failed")
    assert fleet.do(SnapshotReported("n1", unknown)) == []
    not_a_target = JobSnapshot(node="n7", id=apply.id, rollout="r1", action="apply", phase="failed")
    assert fleet.do(SnapshotReported("n7", not_a_target)) == []
    assert fleet.state() == "aborting"


# ---------------------------------------------------------------------- crash recovery


def restart(fleet: Fleet, at: float) -> tuple[Fleet, list[Action]]:
    records = tuple(fleet.engine.record(rid) for rid in fleet.engine.rollout_ids())
    again = Fleet()
    again.sent = {node: list(cmds) for node, cmds in fleet.sent.items()}
    actions = again.do(RolloutsLoaded(records), at=at)
    return again, actions


def test_a_restarted_engine_folds_retained_snapshots_and_continues() -> None:
    fleet = Fleet()
    fleet.create(["n1", "n2", "n3", "n4"], strategy={"waves": [2]}, node_timeout_s=60)
    fleet.succeed("n1")
    fleet.step("n2", 0, "running")
    before = {node: [c.id for c in cmds] for node, cmds in fleet.sent.items()}
    again, actions = restart(fleet, at=T0 + 30)
    # Only still-open commands are published again, with the same ids (agents ignore replays).
    assert published(actions) == {"n2": "apply"}
    assert [a.command.id for a in actions if isinstance(a, PublishCommand)] == before["n2"]
    assert again.state() == "running"
    # n2 finished while the hub was down: its retained snapshot arrives (twice, even).
    again.snap("n2", "succeeded")
    assert again.phases()["n2"] == "succeeded"
    assert list(again.sent) == ["n1", "n2", "n3", "n4"]  # wave 2 went out
    assert again.snap("n2", "succeeded") == []
    # The retained snapshot of n1 replays too: folded, nothing re-sent.
    assert published(again.snap("n1", "succeeded")) == {}
    again.succeed("n3", "n4")
    assert again.state() == "succeeded"
    assert all(len({c.id for c in cmds}) == 1 for cmds in again.sent.values())  # never a second apply


def test_after_a_restart_timeouts_wait_for_the_grace_period() -> None:
    fleet = Fleet()
    fleet.create(["n1"], node_timeout_s=60)
    again, _ = restart(fleet, at=T0 + 100)  # the deadline passed while the hub was down
    assert again.engine.next_deadline() == T0 + 105
    assert again.do(Tick(), at=T0 + 101) == []
    again.snap("n1", "succeeded")  # the retained snapshot came in time
    assert again.state() == "succeeded"


def test_after_a_restart_a_silent_node_times_out_after_the_grace() -> None:
    fleet = Fleet()
    fleet.create(["n1"], node_timeout_s=60)
    again, _ = restart(fleet, at=T0 + 100)
    actions = again.do(Tick(), at=T0 + 105)
    assert published(actions) == {"n1": "abort"}
    assert again.last("n1").issued_at > fleet.last("n1").issued_at


def test_a_restart_keeps_the_issued_at_high_water_of_final_rollouts() -> None:
    fleet = Fleet()
    fleet.create(["n1"])
    fleet.succeed("n1")
    again, actions = restart(fleet, at=T0 - 3600)  # the new hub's clock is behind
    assert published(actions) == {}
    assert again.engine.issued_high_water("n1") == T0
    again.do(RolloutCreated("r2", make_spec(["n1"]), ("n1",), frozenset({"n1"})))
    assert again.last("n1").issued_at > T0
    assert again.summary("r1").state == "succeeded"  # history is kept for list/show and rollback


def test_a_restart_mid_rollback_finishes_it() -> None:
    fleet = Fleet()
    fleet.create(["n1", "n2"])
    fleet.succeed("n1")
    fleet.step("n2", 0, "failed", "exit 1")
    again, actions = restart(fleet, at=T0 + 10)
    assert published(actions) == {"n1": "rollback"}  # the same rollback command, republished
    assert again.last("n1").id == fleet.last("n1").id
    again.snap("n2", "rolled_back", failed_step=0)
    again.snap("n1", "rolled_back")
    assert again.state() == "rolled_back"


def test_unreadable_records_are_refused() -> None:
    engine = RolloutEngine()
    with pytest.raises(InvalidInput, match="rollout record r1"):
        engine.handle(RolloutsLoaded(({"v": 1, "id": "r1", "spec": {"name": "x"}},)), T0)
    with pytest.raises(InvalidInput, match="unsupported version"):
        engine.handle(RolloutsLoaded(({"v": 99, "id": "r1"},)), T0)
    assert not engine.has("r1")
    fleet = Fleet()
    fleet.create(["n1", "n2"])
    record = fleet.engine.record("r1")
    del record["nodes"]["n2"]
    with pytest.raises(InvalidInput, match="waves do not match its nodes"):
        engine.handle(RolloutsLoaded((record,)), T0)
    with pytest.raises(InvalidInput, match="unknown state"):
        engine.handle(RolloutsLoaded(({**fleet.engine.record("r1"), "state": "weird"},)), T0)
    assert check_record(fleet.engine.record("r1")) is None
    assert check_record(record) is not None
    assert not engine.has("r1")


def test_records_round_trip_through_json() -> None:
    import json

    fleet = Fleet()
    fleet.create(["n1", "n2"], strategy={"waves": [1], "soak_s": 5})
    fleet.succeed("n1")
    record = fleet.engine.record("r1")
    assert json.loads(json.dumps(record)) == record
    again = Fleet()
    again.do(RolloutsLoaded((json.loads(json.dumps(record)),)), at=T0 + 1)
    assert again.engine.record("r1") == record


def test_only_a_finished_rollout_can_be_forgotten_and_the_nodes_high_water_stays() -> None:
    fleet = Fleet()
    fleet.create(["n1", "n2"])
    assert fleet.engine.finished() == []
    with pytest.raises(Conflict, match="not finished"):
        fleet.engine.forget("r1")
    fleet.succeed("n1", "n2")
    assert fleet.engine.finished() == ["r1"]
    issued = fleet.engine.issued_high_water("n1")
    fleet.engine.forget("r1")
    assert not fleet.engine.has("r1")
    assert fleet.engine.finished() == []
    with pytest.raises(NotFound):
        fleet.engine.summary("r1")
    # The nodes are free, and what they were last sent still orders the next command.
    fleet.create(["n1"], rid="r2")
    assert fleet.last("n1").issued_at > (issued or 0)
    assert fleet.engine.busy(["n1", "n2"]) == ["n1"]


# ------------------------------------------------------- numbering, counts and reasons (DESIGN 3.11)


def test_meaningful_keeps_the_head_and_the_last_error_line() -> None:
    from hub.core.reports import meaningful, step_name

    assert step_name(2, "service") == "step 3 (service)"
    chatter = (
        "cannot start service demo-app: starting demo-app | loading /etc/demo.conf | "
        "demo-app 2.1: unsupported hardware revision rev-a (needs rev-b) | shutting down"
    )
    assert meaningful(chatter) == (
        "cannot start service demo-app: demo-app 2.1: unsupported hardware revision rev-a (needs rev-b)"
    )
    assert meaningful("exit 1") == "exit 1"
    assert meaningful("boom: line one\nline two") == "boom: line two"
    assert len(meaningful("x" * 5000)) == 300


def test_a_failed_step_is_named_one_based_with_its_meaningful_line() -> None:
    fleet = Fleet()
    fleet.create(["n1"])
    fleet.step("n1", 0, "running")
    detail = "cannot start service app: hello | listening soon | ERROR: port 80 in use | bye"
    actions = fleet.step("n1", 2, "failed", detail, type_="service")
    assert audits(actions, "node_failed")[0].message == (
        "n1 failed step 3 (service): cannot start service app: ERROR: port 80 in use"
    )


def test_a_failed_node_verified_restored_stays_failed_and_counts_as_restored() -> None:
    # The agent's self-restore after a failed step ends "failed" once its restore is verified.
    fleet = Fleet()
    fleet.create(["n1", "n2"], failure={"max_failed": 1})
    fleet.succeed("n1")
    fleet.step("n2", 1, "failed", "exit 1", type_="health")
    counts = fleet.summary().counts
    assert (counts.failed, counts.rolled_back, counts.running) == (1, 0, 0)
    actions = fleet.snap("n2", "failed", failed_step=1, detail="failed step 2 (health): exit 1")
    assert cleared(actions) == ["n2"]
    assert fleet.state() == "succeeded"
    counts = fleet.summary().counts
    assert (counts.succeeded, counts.failed, counts.rolled_back, counts.rollback_failed) == (1, 1, 1, 0)
    assert fleet.phases()["n2"] == "rolled_back"
    assert fleet.summary().nodes["n2"].detail == "failed step 2 (health): exit 1"


def test_an_unverified_self_restore_is_rollback_failed_with_the_evidence() -> None:
    fleet = Fleet()
    fleet.create(["n1", "n2"])
    fleet.succeed("n1")
    fleet.step("n2", 2, "failed", "exit 1", type_="service")
    fleet.snap("n1", "rolled_back")
    evidence = "verify: http://127.0.0.1:8080 answered 2.0, not 1.0"
    fleet.snap("n2", "rollback_failed", failed_step=1, detail=evidence)
    assert fleet.state() == "rollback_failed"
    summary = fleet.summary()
    assert summary.nodes["n2"].phase == "rollback_failed"
    assert summary.detail == (
        "not restored: n2 (failed step 3 (service): exit 1; "
        "not restored: verify: http://127.0.0.1:8080 answered 2.0, not 1.0)"
    )
    counts = summary.counts
    assert (counts.failed, counts.rolled_back, counts.rollback_failed) == (1, 1, 1)


def test_a_rollback_whose_restore_is_not_verified_names_the_node() -> None:
    fleet = Fleet()
    fleet.create(["n1", "n2"])
    fleet.succeed("n1", "n2")
    fleet.do(RollbackRequested("r1"))
    fleet.snap("n1", "rolled_back")
    actions = fleet.snap("n2", "rollback_failed", detail="verify: pid 4242 still serves 2.0")
    assert fleet.state() == "rollback_failed"
    detail = fleet.summary().detail
    assert detail == "not restored: n2 (rollback not verified: verify: pid 4242 still serves 2.0)"
    assert audits(actions, "rollback_failed")[0].evidence["not_restored"] == {
        "n2": "rollback not verified: verify: pid 4242 still serves 2.0"
    }
    counts = fleet.summary().counts
    assert (counts.failed, counts.rolled_back, counts.rollback_failed) == (0, 1, 1)


# ----------------------------------------------------------------- the step grid (issue 14.3)


def test_the_step_grid_keeps_each_steps_state_and_reason_and_survives_a_restart() -> None:
    import json

    fleet = Fleet()
    fleet.create(["n1", "n2", "n3"], failure={"max_failed": 0})
    fleet.succeed("n1")
    fleet.step("n2", 0, "running")
    fleet.step("n2", 0, "succeeded")
    fleet.step("n2", 1, "running", type_="health")
    # A coalesced snapshot that arrives late never moves a step back.
    fleet.snap("n2", "applying")
    fleet.step("n2", 1, "failed", "check: starting | ERROR: answered 1.0, not 2.0", type_="health")
    grid = fleet.engine.steps("r1")
    assert grid["n1"] == [
        {"index": 0, "type": "script", "state": "succeeded", "detail": ""},
        {"index": 1, "type": "health", "state": "succeeded", "detail": ""},
    ]
    assert [c["state"] for c in grid["n2"]] == ["succeeded", "failed"]
    assert grid["n2"][1]["detail"] == "check: ERROR: answered 1.0, not 2.0"
    assert [c["state"] for c in grid["n3"]] == ["pending", "pending"]  # sent, not reported yet
    # The node's own restore: the undone step is rolled_back, the failed one stays failed.
    fleet.step("n2", 0, "rolled_back")
    fleet.step("n2", 1, "rolled_back", type_="health")
    assert [c["state"] for c in fleet.engine.steps("r1")["n2"]] == ["rolled_back", "failed"]
    # The hub's record keeps the grid: a restarted hub serves the same one.
    record = json.loads(json.dumps(fleet.engine.record("r1")))
    again = Fleet()
    again.do(RolloutsLoaded((record,)), at=T0 + 1)
    assert again.engine.steps("r1") == fleet.engine.steps("r1")
    broken = json.loads(json.dumps(record))
    broken["nodes"]["n2"]["grid"] = "x"
    assert "steps are unreadable" in (check_record(broken) or "")


def test_a_big_rollout_leaves_untouched_nodes_out_of_the_grid() -> None:
    fleet = Fleet()
    nodes = [f"n{i}" for i in range(10)]
    fleet.create(nodes, strategy={"waves": [2]})
    fleet.succeed("n0")
    assert set(fleet.engine.steps("r1", limit=8)) == {"n0"}
    assert len(fleet.engine.steps("r1")) == 10


def test_a_unique_prefix_names_its_rollout_and_an_ambiguous_one_is_refused_with_the_candidates() -> None:
    fleet = Fleet()
    fleet.create(["n1"], rid="1a7e70f1-0001")
    fleet.create(["n2"], rid="1a7e70f1-0002")
    fleet.create(["n3"], rid="2b000000-0003")
    assert fleet.engine.resolve("2b") == "2b000000-0003"
    assert fleet.engine.resolve("1a7e70f1-0002") == "1a7e70f1-0002"
    with pytest.raises(InvalidInput, match=r"ambiguous: it matches 1a7e70f1-0001, 1a7e70f1-0002"):
        fleet.engine.resolve("1a7e70f1")
    with pytest.raises(NotFound, match="unknown rollout"):
        fleet.engine.resolve("3c")


# ----------------------------------------------------------- transient faults (issue 15)


def test_a_lost_node_back_within_its_grace_carries_on() -> None:
    fleet = Fleet()
    fleet.create(["n1", "n2"], offline_grace_s=30)
    fleet.step("n1", 0, "running")
    fleet.do(PresenceChanged("n1", False), at=T0 + 1)
    assert fleet.phases()["n1"] == "lost"
    fleet.succeed("n2")
    assert fleet.state() == "running"  # the lost node holds its wave
    actions = fleet.do(PresenceChanged("n1", True), at=T0 + 20)
    assert fleet.phases()["n1"] == "applying"
    # A broker that lost its retained command gets the same one again (a replay is ignored).
    assert [a.command.id for a in actions if isinstance(a, PublishCommand)] == [fleet.sent["n1"][0].id]
    assert audits(actions, "node_back")[0].message == "n1 back after 19 s"
    fleet.do(Tick(), at=T0 + 40)  # past the grace, but it is back: nothing happens
    fleet.snap("n1", "succeeded")
    assert fleet.state() == "succeeded"
    assert {(c.id, c.action) for c in fleet.sent["n1"]} == {(fleet.sent["n1"][0].id, "apply")}


def test_a_lost_nodes_own_report_says_where_it_is() -> None:
    fleet = Fleet()
    fleet.create(["n1"], offline_grace_s=30)
    fleet.step("n1", 0, "running")
    fleet.do(PresenceChanged("n1", False), at=T0 + 1)
    fleet.snap("n1", "succeeded")  # it finished alone; its retained snapshot arrives first
    assert fleet.state() == "succeeded"
    assert fleet.summary().counts.lost == 0


def test_many_nodes_lost_at_once_pause_the_rollout_instead_of_failing_it() -> None:
    fleet = Fleet()
    nodes = ["n1", "n2", "n3", "n4", "n5"]
    fleet.create(nodes, strategy={"waves": [3]}, offline_grace_s=10)
    for node in ("n1", "n2", "n3"):
        fleet.step(node, 0, "running")
    fleet.do(PresenceChanged("n1", False), at=T0 + 1)
    actions = fleet.do(PresenceChanged("n2", False), at=T0 + 1.5)
    actions += fleet.do(PresenceChanged("n3", False), at=T0 + 2)
    outage = audits(actions, "outage")
    assert [a.message for a in outage] == ["broker connection lost: 2 nodes lost at once; waiting"]
    assert fleet.summary().counts.lost == 3
    # Past the grace nobody fails: it is a broker event.
    assert fleet.do(Tick(), at=T0 + 60) == []
    assert fleet.state() == "running"
    # They come back, finish their jobs; only then does the next wave go out.
    fleet.do(PresenceChanged("n1", True), at=T0 + 61)
    fleet.do(PresenceChanged("n2", True), at=T0 + 61)
    fleet.snap("n1", "succeeded")
    fleet.snap("n2", "succeeded")
    assert "n4" not in fleet.sent  # n3 still lost: no new commands
    actions = fleet.do(PresenceChanged("n3", True), at=T0 + 62)
    assert audits(actions, "outage_over")[0].message == "nodes back after 60.5 s: resuming"
    fleet.snap("n3", "succeeded")
    assert "n4" in fleet.sent
    fleet.succeed("n4", "n5")
    assert fleet.state() == "succeeded"
    assert all(len({c.id for c in cmds}) == 1 for cmds in fleet.sent.values())  # resent, never a second


def test_the_hubs_own_disconnect_is_a_broker_event_and_retained_wills_do_not_fail_nodes() -> None:
    fleet = Fleet(grace=5.0)
    fleet.create(["n1", "n2"], offline_grace_s=10, node_timeout_s=30)
    fleet.step("n1", 0, "running")
    fleet.step("n2", 0, "running")
    actions = fleet.do(BrokerChanged(False), at=T0 + 1)
    assert audits(actions, "outage")[0].message == "broker connection lost: the hub is disconnected; waiting"
    assert fleet.do(Tick(), at=T0 + 40) == []  # past the node timeout while blind: nothing
    fleet.do(BrokerChanged(True), at=T0 + 41)
    fleet.do(PresenceChanged("n1", False), at=T0 + 41.1)  # the retained wills the broker sent
    fleet.do(PresenceChanged("n2", False), at=T0 + 41.1)
    fleet.do(PresenceChanged("n1", True), at=T0 + 42)
    fleet.do(PresenceChanged("n2", True), at=T0 + 42.5)
    assert fleet.state() == "running"
    actions = fleet.do(Tick(), at=T0 + 46)  # settled: the outage is over
    assert audits(actions, "outage_over")
    fleet.snap("n1", "succeeded")
    fleet.snap("n2", "succeeded")
    assert fleet.state() == "succeeded"


def test_a_broker_event_past_its_limit_halts_for_the_operator_instead_of_rolling_back() -> None:
    counter = itertools.count(1)
    engine = RolloutEngine(new_id=lambda: f"c{next(counter)}", outage_limit_s=120, strict=True)
    spec = make_spec(["n1", "n2", "n3"], strategy={"waves": [2]})
    engine.handle(RolloutCreated("r1", spec, ("n1", "n2", "n3"), frozenset({"n1", "n2", "n3"})), T0)
    engine.handle(BrokerChanged(False), T0 + 1)
    assert engine.next_deadline() == T0 + 121
    actions = engine.handle(Tick(), T0 + 121)
    assert engine.state("r1") == "halted"
    assert not [a for a in actions if isinstance(a, PublishCommand)]
    assert engine.summary("r1").detail.startswith(
        "halted: broker connection lost: the hub is disconnected at 22:13:21 UTC; after 120 s"
    )


def test_a_rollback_waiting_for_an_offline_node_says_so_and_ends_at_restore_timeout_s() -> None:
    fleet = Fleet()
    fleet.create(["n1", "n2"], strategy={"waves": [1]}, restore_timeout_s=600, node_timeout_s=3600)
    fleet.succeed("n1")
    fleet.do(PresenceChanged("n1", False), at=T0 + 5)  # done and soaked: not lost, not failed
    actions = fleet.step("n2", 0, "failed", "exit 1")
    assert published(actions) == {"n1": "rollback"}
    fleet.snap("n2", "failed", failed_step=0)  # its own restore, verified
    summary = fleet.summary()
    assert summary.state == "rolling_back"
    assert summary.detail == (
        "rolling back: waiting for n1 (offline since 22:13:25 UTC) to restore, until 22:23:25 UTC"
    )
    waits = [e for e in fleet.history if isinstance(e, Audit) and e.kind == "restore_wait"]
    assert [a.message for a in waits] == [summary.detail]  # said once, in the audit too
    assert fleet.engine.next_deadline() == T0 + 605
    actions = fleet.do(Tick(), at=T0 + 605)
    assert fleet.state() == "rollback_failed"
    assert fleet.summary().detail == (
        "not restored: n1 (not restored: offline since 22:13:25 UTC, no restore within "
        "restore_timeout_s (600 s))"
    )
    assert cleared(actions) == []  # its retained rollback still waits for it
    # Later it comes back and restores, verified: the record is amended.
    fleet.do(PresenceChanged("n1", True), at=T0 + 900)
    actions = fleet.snap("n1", "rolled_back")
    assert fleet.state() == "rolled_back"
    assert audits(actions, "late_restore")
    counts = fleet.summary().counts
    assert (counts.failed, counts.rolled_back, counts.rollback_failed) == (1, 2, 0)


def test_a_lost_node_in_a_coordinated_rollback_gets_its_abort_and_is_awaited() -> None:
    fleet = Fleet()
    fleet.create(["n1", "n2"], offline_grace_s=60, restore_timeout_s=100)
    fleet.step("n1", 0, "running")
    fleet.do(PresenceChanged("n1", False), at=T0 + 1)
    actions = fleet.step("n2", 0, "failed", "exit 1")
    assert published(actions) == {"n1": "abort"}
    assert fleet.phases()["n1"] == "offline"
    assert fleet.engine.next_deadline() == T0 + 101
    fleet.do(PresenceChanged("n1", True), at=T0 + 50)
    assert fleet.phases()["n1"] == "rolling_back"
    fleet.snap("n2", "failed", failed_step=0)
    fleet.snap("n1", "rolled_back")
    assert fleet.state() == "rolled_back"


def test_a_rollout_halted_by_a_long_outage_leaves_its_lost_nodes_be_and_wakes_nobody() -> None:
    counter = itertools.count(1)
    engine = RolloutEngine(new_id=lambda: f"c{next(counter)}", outage_limit_s=60, strict=True)
    spec = make_spec(["n1", "n2", "n3"], offline_grace_s=5)
    engine.handle(RolloutCreated("r1", spec, ("n1", "n2", "n3"), frozenset({"n1", "n2", "n3"})), T0)
    for node in ("n1", "n2", "n3"):
        engine.handle(PresenceChanged(node, False), T0 + 1)
    engine.handle(Tick(), T0 + 62)
    assert engine.state("r1") == "halted"
    assert engine.summary("r1").counts.lost == 3
    deadline = engine.next_deadline()
    assert deadline is None or deadline > T0 + 62  # no deadline in the past: the timer would spin
    assert engine.handle(Tick(), T0 + 500) == []  # nobody fails: the operator decides
    # A node that comes back carries on in the halted rollout.
    engine.handle(PresenceChanged("n1", True), T0 + 600)
    assert engine.summary("r1").nodes["n1"].phase == "applying"


def test_a_rollout_that_finished_during_an_outage_rolls_back_on_request_with_its_deadlines() -> None:
    fleet = Fleet()
    fleet.create(["n1", "n2"], node_timeout_s=60)
    fleet.step("n1", 0, "running")
    fleet.do(BrokerChanged(False), at=T0 + 1)
    fleet.snap("n1", "succeeded")
    fleet.snap("n2", "succeeded")
    assert fleet.state() == "succeeded"
    fleet.do(BrokerChanged(True), at=T0 + 2)
    assert fleet.engine.next_deadline() == T0 + 7  # settling: retained wills may still come
    fleet.do(Tick(), at=T0 + 7)
    fleet.do(RollbackRequested("r1"), at=T0 + 10)
    assert fleet.engine.next_deadline() == T0 + 70
    actions = fleet.do(Tick(), at=T0 + 70)
    assert fleet.state() == "rollback_failed"  # nobody answered within node_timeout_s
    assert audits(actions, "rollback_failed")


def test_a_lost_nodes_timeout_waits_while_it_is_away() -> None:
    fleet = Fleet()
    fleet.create(["n1"], node_timeout_s=60, offline_grace_s=30)
    fleet.step("n1", 0, "running")
    fleet.do(PresenceChanged("n1", False), at=T0 + 50)
    assert fleet.engine.next_deadline() == T0 + 80  # its grace, not its (passing) node timeout
    fleet.do(PresenceChanged("n1", True), at=T0 + 70)
    assert fleet.engine.next_deadline() == T0 + 80  # node timeout 60 + 20 s away
    fleet.snap("n1", "succeeded")
    assert fleet.state() == "succeeded"


def test_a_few_nodes_lost_among_many_in_play_are_single_losses_not_a_broker_event() -> None:
    fleet = Fleet()
    nodes = [f"n{i}" for i in range(6)]
    fleet.create(nodes, strategy={"waves": ["100%"], "soak_s": 60}, offline_grace_s=10)
    fleet.succeed("n0", "n1", "n2", "n3")  # soaking (in play) while n4 and n5 run
    fleet.step("n4", 0, "running")
    fleet.step("n5", 0, "running")
    fleet.do(PresenceChanged("n4", False), at=T0 + 1)
    actions = fleet.do(PresenceChanged("n5", False), at=T0 + 1.5)
    assert audits(actions, "outage") == []  # 2 of 6 in play: not more than half
    actions = fleet.do(Tick(), at=T0 + 11)
    assert fleet.state() == "rolling_back"  # each is a failure after its grace


def test_record_and_summary_rows_are_right_at_every_moment_each_node_made_again_only_when_changed() -> None:
    """``encoded_record`` (the store's document and the standby's parts) and ``summary_rows``
    (the summary and per-node changes), both made every summary round from what changed,
    equal ``record`` and ``summary`` made whole after each report, to the rollout's end."""
    fleet = Fleet()
    nodes = ["n1", "n2", "n3", "n4"]
    fleet.create(nodes, strategy={"waves": [1, 2, "100%"]})

    def same() -> dict[str, str]:
        encoded = fleet.engine.encoded_record("r1")
        assert json.loads(encoded.text) == fleet.engine.record("r1")
        head, rows = fleet.engine.summary_rows("r1")
        whole = fleet.summary()
        assert head.counts == whole.counts
        assert head.state == whole.state
        assert {name: row[:3] for name, row in rows.items()} == {
            name: (n.phase, n.step, n.detail) for name, n in whole.nodes.items()
        }
        assert list(rows) == nodes
        return encoded.nodes

    before = same()
    fleet.step("n1", 0, "running")
    after = same()
    assert after["n1"] != before["n1"]  # its grid changed: seen
    assert after["n2"] is before["n2"]  # untouched: the same text, not encoded again
    fleet.step("n1", 0, "succeeded")
    same()
    fleet.snap("n1", "succeeded")
    same()
    for node in ("n2", "n3"):
        fleet.snap(node, "failed", failed_step=0)
        same()
    assert fleet.state() == "rolling_back"
    for node in ("n1", "n2", "n3"):
        fleet.snap(node, "rolled_back")  # its rollback or abort, or the failed apply undone
        same()
    assert fleet.state() == "rolled_back", fleet.summary()
    head, rows = fleet.engine.summary_rows("r1")
    assert rows["n4"][0] == "not_started"  # a finished rollout shows no pending node
    assert head.counts.rolled_back == 3
    assert rows["n2"][3]  # (n2 failed; n3's failure came after its abort)
