"""The executor's pure core: journal transitions, undo order, recovery decisions, snapshots."""

from __future__ import annotations

from typing import Any

from bus.messages import Command, ScriptStep
from edge_agent import executor
from edge_agent.executor import JournalState, StepEntry


def cmd(
    rollout: str = "r1", action: str = "apply", steps: int = 3, issued_at: float = 100.0, cid: str = "c1"
) -> Command:
    plan = [ScriptStep(name=f"s{i}.sh").model_dump() for i in range(steps)] if action == "apply" else []
    return Command.model_validate(
        {
            "id": cid,
            "node": "n1",
            "rollout": rollout,
            "action": action,
            "issued_at": issued_at,
            "expires_at": issued_at + 60,
            "plan": plan,
        }
    )


def entries(*states: tuple[str, str]) -> list[StepEntry]:
    return [StepEntry(index=i, type="script", state=s, undo=u) for i, (s, u) in enumerate(states)]


def run(state: JournalState, rollout: str, *changes: tuple[int, dict[str, Any]]) -> JournalState:
    for index, change in changes:
        state = executor.update_step(state, rollout, index, **change)
    return state


def test_undo_order_is_reverse_of_everything_started_and_not_undone() -> None:
    steps = entries(
        ("succeeded", "none"),
        ("succeeded", "done"),
        ("succeeded", "failed"),
        ("failed", "none"),
        ("pending", "none"),
    )
    assert executor.undo_order(steps) == [3, 2, 0]
    assert executor.undo_order(entries(("cancelled", "none"), ("interrupted", "running"))) == [1, 0]
    assert executor.undo_order(entries(("pending", "none"))) == []


def test_begin_an_apply_makes_it_active_with_every_step_pending() -> None:
    state = executor.begin(JournalState(), cmd())
    assert state.active is not None
    assert (state.active.command, state.active.action, state.active.rollout) == ("c1", "apply", "r1")
    entry = state.applies["r1"]
    assert [(s.index, s.state, s.undo) for s in entry.steps] == [(i, "pending", "none") for i in range(3)]
    assert entry.phase == "applying"
    assert [p.type for p in entry.plan] == ["script"] * 3


def test_a_new_apply_of_a_rollout_replaces_its_entry_and_old_rollouts_are_dropped() -> None:
    state = JournalState()
    for i in range(executor.MAX_APPLIES + 5):
        state = executor.finish(executor.begin(state, cmd(rollout=f"r{i}", issued_at=float(i), cid=f"c{i}")))
    assert len(state.applies) == executor.MAX_APPLIES
    assert "r0" not in state.applies
    assert f"r{executor.MAX_APPLIES + 4}" in state.applies
    state = executor.begin(state, cmd(rollout="r10", cid="again", issued_at=1000.0))
    assert state.applies["r10"].command == "again"
    assert len(state.applies) == executor.MAX_APPLIES


def test_rollback_and_abort_do_not_touch_the_recorded_applies() -> None:
    state = executor.finish(executor.begin(JournalState(), cmd()))
    after = executor.begin(state, cmd(action="rollback", cid="rb"))
    assert after.applies == state.applies
    assert after.active is not None
    assert after.active.action == "rollback"
    adopted = executor.adopt(after, cmd(action="abort", cid="ab"))
    assert adopted.active is not None
    assert adopted.active.command == "ab"


def test_remember_keeps_the_last_ids_and_the_latest_issued_at() -> None:
    state = JournalState()
    for i in range(executor.MAX_SEEN + 10):
        state = executor.remember(state, f"id{i}", float(i))
    assert len(state.seen) == executor.MAX_SEEN
    assert state.seen[-1] == f"id{executor.MAX_SEEN + 9}"
    assert "id0" not in state.seen
    assert state.last_issued_at == executor.MAX_SEEN + 9
    state = executor.remember(state, "rejected-one", None)  # a rejected command does not move the floor
    assert state.last_issued_at == executor.MAX_SEEN + 9
    state = executor.remember(state, "old", 1.0)
    assert state.last_issued_at == executor.MAX_SEEN + 9
    assert executor.remember(state, "old", 1.0).seen.count("old") == 1


def test_recovery_of_an_apply_interrupted_mid_step() -> None:
    state = executor.begin(JournalState(), cmd())
    state = run(
        state, "r1", (0, {"state": "succeeded"}), (1, {"state": "running", "record": {"started": True}})
    )
    plan = executor.recovery(state)
    assert plan is not None
    assert plan.job.command == "c1"
    assert plan.interrupted == 1
    assert plan.undo == [1, 0]


def test_recovery_of_an_undo_pass_interrupted_half_way() -> None:
    state = executor.begin(JournalState(), cmd())
    state = run(
        state,
        "r1",
        (0, {"state": "succeeded"}),
        (1, {"state": "succeeded"}),
        (2, {"state": "failed", "undo": "done"}),
        (1, {"undo": "running"}),
    )
    state = executor.set_phase(state, "r1", "rolling_back")
    plan = executor.recovery(state)
    assert plan is not None
    assert plan.interrupted is None
    assert plan.undo == [1, 0]  # step 1's undo runs again (undo is idempotent), then step 0


def test_nothing_to_recover() -> None:
    assert executor.recovery(JournalState()) is None
    done = executor.finish(executor.set_phase(executor.begin(JournalState(), cmd()), "r1", "succeeded"))
    assert executor.recovery(done) is None
    rollback_without_entry = executor.begin(JournalState(), cmd(rollout="gone", action="rollback"))
    plan = executor.recovery(rollback_without_entry)
    assert plan is not None
    assert (plan.entry, plan.undo) == (None, [])
    finished_not_cleared = executor.set_phase(executor.begin(JournalState(), cmd()), "r1", "succeeded")
    plan = executor.recovery(finished_not_cleared)
    assert plan is not None
    assert plan.undo == []


def test_a_failed_step_stays_visible_after_it_was_undone() -> None:
    state = executor.begin(JournalState(), cmd(steps=4))
    state = run(
        state,
        "r1",
        (0, {"state": "succeeded", "undo": "done"}),
        (1, {"state": "failed", "detail": "boom", "undo": "done"}),
    )
    snap = executor.snapshot(state.active, state.applies["r1"], node="n1", phase="rolled_back", now=5.0)  # type: ignore[arg-type]
    assert [(s.state, s.detail) for s in snap.steps] == [
        ("rolled_back", ""),
        ("failed", "boom"),
        ("skipped", ""),
        ("skipped", ""),
    ]
    assert (snap.id, snap.action, snap.phase, snap.updated_at, snap.issued_at) == (
        "c1",
        "apply",
        "rolled_back",
        5.0,
        100.0,
    )


def test_snapshot_while_applying_and_after_a_failed_undo() -> None:
    state = executor.begin(JournalState(), cmd(steps=3))
    state = run(state, "r1", (0, {"state": "succeeded"}), (1, {"state": "running"}))
    active = state.active
    assert active is not None
    snap = executor.snapshot(active, state.applies["r1"], node="n1", phase="applying", now=1.0)
    assert [s.state for s in snap.steps] == ["succeeded", "running", "pending"]
    state = run(
        state, "r1", (1, {"state": "cancelled", "undo": "done"}), (0, {"undo": "failed", "undo_detail": "no"})
    )
    snap = executor.snapshot(active, state.applies["r1"], node="n1", phase="failed", now=1.0)
    assert [(s.state, s.detail) for s in snap.steps] == [
        ("failed", "no"),
        ("rolled_back", ""),
        ("skipped", ""),
    ]


def test_undo_outcome_names_every_failed_undo() -> None:
    state = executor.begin(JournalState(), cmd(steps=3))
    state = run(
        state,
        "r1",
        (0, {"state": "succeeded", "undo": "failed", "undo_detail": "rollback.sh exited with status 1"}),
        (1, {"state": "succeeded", "undo": "done"}),
        (2, {"state": "failed", "undo": "failed", "undo_detail": "timed out"}),
    )
    phase, detail = executor.undo_outcome(state.applies["r1"])
    assert phase == "failed"
    assert detail == (
        "undo of step 0 (script) failed: rollback.sh exited with status 1; "
        "undo of step 2 (script) failed: timed out"
    )
    clean = run(state, "r1", (0, {"undo": "done"}), (2, {"undo": "done"}))
    assert executor.undo_outcome(clean.applies["r1"]) == ("rolled_back", "")


def test_journal_state_round_trips_through_json() -> None:
    state = executor.remember(executor.begin(JournalState(), cmd()), "c1", 100.0)
    state = run(state, "r1", (0, {"state": "succeeded", "record": {"pid": 12, "nested": {"a": [1, "b"]}}}))
    assert JournalState.model_validate_json(state.model_dump_json()) == state
