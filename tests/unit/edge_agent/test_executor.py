"""The executor's pure core: journal transitions, undo order, recovery decisions, snapshots."""

from __future__ import annotations

from typing import Any

from bus.messages import (
    Command,
    DownloadStep,
    FileStep,
    HealthStep,
    ModuleStep,
    ScriptStep,
    ServiceStep,
    Step,
)
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
    assert phase == "rollback_failed"
    assert detail == (  # steps numbered from 1, as people count (DESIGN 3.11)
        "undo of step 1 (script) failed: rollback.sh exited with status 1; "
        "undo of step 3 (script) failed: timed out"
    )
    clean = run(state, "r1", (0, {"undo": "done"}), (2, {"undo": "done"}))
    assert executor.undo_outcome(clean.applies["r1"]) == ("rolled_back", "")


def test_journal_state_round_trips_through_json() -> None:
    state = executor.remember(executor.begin(JournalState(), cmd()), "c1", 100.0)
    state = run(state, "r1", (0, {"state": "succeeded", "record": {"pid": 12, "nested": {"a": [1, "b"]}}}))
    assert JournalState.model_validate_json(state.model_dump_json()) == state


def _plan_entry(plan: list[Step], *states: tuple[str, str]) -> list[StepEntry]:
    return [StepEntry(index=i, type=plan[i].type, state=s, undo=u) for i, (s, u) in enumerate(states)]


def test_a_restart_is_undone_after_the_files_it_serves() -> None:
    # download -> file -> restart -> health, rolled back: the restart's undo (restart again)
    # must see the restored 1.0 file, so it goes after every other undo (issue 24).
    plan: list[Step] = [
        DownloadStep(url="http://h/a", sha256="0" * 64, name="a"),
        FileStep(src="a", dest="app/version.json"),
        ServiceStep(action="restart", name="app"),
        HealthStep(check="tcp", target="127.0.0.1:1"),
    ]
    done = _plan_entry(plan, *[("succeeded", "none")] * 4)
    assert executor.undo_order(done, plan) == [3, 1, 0, 2]
    assert executor.undo_order(done) == [3, 2, 1, 0]  # without the plan: plain reverse order
    # stop -> file -> start keeps the reverse order (start's undo stops, stop's undo starts)
    plain: list[Step] = [
        ServiceStep(action="stop", name="app"),
        FileStep(src="a", dest="x"),
        ServiceStep(action="start", name="app"),
    ]
    assert executor.undo_order(_plan_entry(plain, *[("succeeded", "none")] * 3), plain) == [2, 1, 0]
    # two deferred undos keep reverse order among themselves; a module reload is deferred too
    both: list[Step] = [
        ServiceStep(action="restart", name="a"),
        FileStep(src="a", dest="x"),
        ModuleStep(name="m", action="reload"),
        FileStep(src="a", dest="y"),
    ]
    states = [("succeeded", "none"), ("succeeded", "none"), ("succeeded", "none"), ("failed", "none")]
    assert executor.undo_order(_plan_entry(both, *states), both) == [3, 1, 2, 0]
    assert executor.is_deferred_undo(both[0])
    assert not executor.is_deferred_undo(plain[0])


def test_recovery_defers_a_restart_undo_too() -> None:
    command = Command.model_validate(
        {
            "id": "c1", "node": "n1", "rollout": "r1", "action": "apply", "issued_at": 1.0,
            "expires_at": 60.0,
            "plan": [
                FileStep(src="a", dest="x").model_dump(),
                ServiceStep(action="restart", name="app").model_dump(),
                FileStep(src="b", dest="y").model_dump(),
            ],
        }
    )  # fmt: skip
    state = run(
        executor.begin(JournalState(), command),
        "r1",
        (0, {"state": "succeeded"}),
        (1, {"state": "succeeded"}),
        (2, {"state": "running"}),
    )
    plan = executor.recovery(state)
    assert plan is not None
    assert plan.undo == [2, 0, 1]


def test_final_phase_is_rolled_back_only_when_the_restore_is_verified() -> None:
    state = executor.begin(JournalState(), cmd(steps=3))
    undone = run(
        state,
        "r1",
        (0, {"state": "succeeded", "undo": "done"}),
        (1, {"state": "succeeded", "undo": "done"}),
        (2, {"state": "succeeded", "undo": "done", "verified": "passed", "verify_detail": "tcp h:1"}),
    )
    assert executor.final_phase(undone.applies["r1"], self_restore=False) == (
        "rolled_back",
        "restore verified: step 3 (script) tcp h:1",
    )
    lie = run(undone, "r1", (2, {"verified": "failed", "verify_detail": "'1.0' not in the response"}))
    phase, detail = executor.final_phase(lie.applies["r1"], self_restore=False)
    assert phase == "rollback_failed"
    assert detail == "restore not verified: step 3 (script) '1.0' not in the response"
    assert lie.active is not None
    shown = executor.snapshot(lie.active, lie.applies["r1"], node="n1", phase=phase, now=1.0, detail=detail)
    assert shown.steps[2].state == "failed"
    assert shown.steps[2].detail == "restore not verified: '1.0' not in the response"
    # An undo that failed is rollback_failed whatever the checks say.
    broken = run(undone, "r1", (1, {"undo": "failed", "undo_detail": "boom"}))
    assert executor.final_phase(broken.applies["r1"], self_restore=True) == (
        "rollback_failed",
        "undo of step 2 (script) failed: boom",
    )


def test_a_failed_step_restored_and_verified_ends_failed_naming_the_step() -> None:
    state = executor.begin(JournalState(), cmd(steps=3))
    restored = run(
        state,
        "r1",
        (0, {"state": "succeeded", "undo": "done"}),
        (1, {"state": "failed", "undo": "done", "detail": "svc.sh exited with status 1"}),
        (2, {"verified": "passed", "verify_detail": "command check.sh 1.0"}),
    )
    assert executor.final_phase(restored.applies["r1"], self_restore=True) == (
        "failed",
        "step 2 (script) failed: svc.sh exited with status 1; node restored, "
        "restore verified: step 3 (script) command check.sh 1.0",
    )
    # No health check in the plan: nothing could verify it, and the detail says so.
    bare = run(state, "r1", (0, {"state": "succeeded", "undo": "done"}))
    assert executor.final_phase(bare.applies["r1"], self_restore=False) == (
        "rolled_back",
        "restore not checked: the plan has no health check to verify it",
    )
