"""A node's stage (hub.core.state): read in one place, its moves in one table, checked on every move."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from bus.messages import JobSnapshot, StepState, StepStatus
from hub.core.engine import Audit, StageError, Tick, _Out
from hub.core.reports import Move, decide, report_of_snapshot, report_of_status
from hub.core.state import TRANSITIONS, Node, NodeStage, is_allowed, stage_of
from tests.unit.hub.test_engine import T0, Fleet

S = NodeStage


def node(**fields: Any) -> Node:
    return Node(name="n1", wave=0, **fields)


def test_every_stage_has_its_row_and_only_names_stages() -> None:
    assert set(TRANSITIONS) == set(NodeStage)
    assert all(isinstance(to, NodeStage) for row in TRANSITIONS.values() for to in row)
    assert all(stage not in row for stage, row in TRANSITIONS.items())  # staying is implied


@pytest.mark.parametrize(
    ("before", "after", "allowed"),
    [
        (S.PENDING, S.APPLYING, True),
        (S.PENDING, S.QUEUED, True),
        (S.QUEUED, S.WITHDRAWN, True),
        (S.WITHDRAWN, S.RESTORING, True),  # it started after all: an abort
        (S.APPLYING, S.LOST, True),
        (S.LOST, S.APPLYING, True),
        (S.SUCCEEDED, S.RESTORING, True),
        (S.RESTORING, S.UNRESTORED, True),
        (S.UNRESTORED, S.RESTORED, True),  # restored late
        (S.SUCCEEDED, S.SUCCEEDED, True),
        # What would be a bug:
        (S.SUCCEEDED, S.APPLYING, False),
        (S.SUCCEEDED, S.FAILED, False),
        (S.FAILED, S.SUCCEEDED, False),
        (S.RESTORED, S.RESTORING, False),
        (S.RESTORED, S.APPLYING, False),
        (S.NOT_STARTED, S.SUCCEEDED, False),
        (S.WITHDRAWN, S.APPLYING, False),
        (S.RESTORING, S.SUCCEEDED, False),
        (S.PENDING, S.LOST, False),
    ],
)
def test_the_table_allows_the_lifecycle_and_nothing_else(before: S, after: S, allowed: bool) -> None:
    assert is_allowed(before, after) is allowed


def test_the_stage_is_read_from_the_fields() -> None:
    assert stage_of(node()) is S.PENDING
    assert stage_of(node(queued=True, detail="queued: node offline")) is S.QUEUED
    assert stage_of(node(withdrawn=True)) is S.WITHDRAWN
    assert stage_of(node(phase="deferred")) is S.DEFERRED
    assert stage_of(node(phase="applying", touched=True)) is S.APPLYING
    assert stage_of(node(phase="lost", applied=True, lost_from="succeeded")) is S.LOST
    assert stage_of(node(phase="succeeded", applied=True)) is S.SUCCEEDED
    assert stage_of(node(phase="not_started", withdrawn=True)) is S.NOT_STARTED
    assert stage_of(node(phase="timed_out", failed=True)) is S.FAILED
    assert stage_of(node(phase="failed", failed=True, restore="waiting")) is S.RESTORING
    assert stage_of(node(phase="rolling_back", applied=True, restore="waiting")) is S.RESTORING
    assert stage_of(node(phase="rolled_back", restore="restored")) is S.RESTORED
    assert stage_of(node(phase="rollback_failed", restore="unrestored")) is S.UNRESTORED


def test_a_step_report_and_a_snapshot_saying_the_same_decide_the_same() -> None:
    applying = node(phase="applying", touched=True, action="apply", command_id="c1")
    status = StepStatus(node="n1", command="c1", rollout="r1", index=1, type="script", state="failed",
                        ts=T0, detail="exit 1")  # fmt: skip
    steps = [StepState(index=0, type="script", state="succeeded"),
             StepState(index=1, type="script", state="failed", detail="exit 1")]  # fmt: skip
    snap = JobSnapshot(node="n1", id="c1", rollout="r1", action="apply", phase="rolling_back", steps=steps)
    by_status, by_snapshot = (
        decide(applying, report_of_status(status)),
        decide(applying, report_of_snapshot(snap)),
    )
    assert [v.move for v in by_status] == [v.move for v in by_snapshot] == [Move.FAIL]
    assert by_status[0].reason == by_snapshot[0].reason == "failed step 2 (script): exit 1"
    assert (by_status[0].step, by_snapshot[0].step) == (1, 1)
    # The job then ends failed with its restore unverified: fail (if not yet) and not restored.
    ended = snap.model_copy(update={"phase": "rollback_failed", "detail": "health still failing"})
    moves = decide(applying, report_of_snapshot(ended))
    assert [v.move for v in moves] == [Move.FAIL, Move.UNRESTORED]
    assert moves[1].reason == "not restored: health still failing"
    # A node already failed and restoring only learns its restore's outcome.
    restoring = dataclasses.replace(applying, failed=True, phase="failed", restore="waiting")
    assert [v.move for v in decide(restoring, report_of_snapshot(ended))] == [Move.UNRESTORED]
    # A report of a node already done changes nothing.
    done = node(phase="succeeded", applied=True, action="apply", command_id="c1")
    assert decide(done, report_of_status(status)) == ()


def test_a_move_outside_the_table_raises_in_a_strict_engine_and_is_audited_otherwise() -> None:
    for strict in (True, False):
        fleet = Fleet()
        fleet.engine._strict = strict
        fleet.create(["n1", "n2"], strategy={"waves": [2]})
        r = fleet.engine._rollouts["r1"]
        assert stage_of(r.nodes["n1"]) is S.APPLYING
        # A bug: a running node's apply withdrawn as if it had never started.
        fleet.engine._withdraw(r, r.nodes["n1"], fleet.now, _Out())
        if strict:
            with pytest.raises(StageError, match="n1 moved from applying to withdrawn"):
                fleet.do(Tick(), T0 + 1)
        else:
            actions = fleet.do(Tick(), T0 + 1)
            audits = [a for a in actions if isinstance(a, Audit) and a.kind == "stage_unexpected"]
            assert [a.node for a in audits] == ["n1"]
            assert audits[0].evidence == {"from": "applying", "to": "withdrawn"}
