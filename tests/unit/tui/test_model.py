from __future__ import annotations

from bus.messages import (
    Event,
    Heartbeat,
    HubState,
    Inventory,
    JobRef,
    JobSnapshot,
    LogLine,
    NodeState,
    NodeSummary,
    RolloutCounts,
    RolloutNodes,
    RolloutSummary,
    StepState,
    StepStatus,
)
from tui.cells import age_text, clock_text, counts_text, progress_text, step_text
from tui.model import Cleared, FleetModel, parse_filter, versions_text

NOW = 1_000_000.0


def state(node: str, session: str = "s1", online: bool = True, **kw: object) -> NodeState:
    return NodeState(
        node=node,
        state="online" if online else "offline",
        session=session,
        reason="birth" if online else "lost",
        **kw,
    )


def beat(
    node: str, session: str = "s1", seq: int = 0, load: float = 0.5, job: JobRef | None = None
) -> Heartbeat:
    return Heartbeat(
        node=node, session=session, seq=seq, ts=NOW, load1=load, mem_used_pct=40, disk_free_pct=70, job=job
    )


def test_birth_then_heartbeats_make_an_online_node_with_load_history() -> None:
    model = FleetModel()
    changes = model.apply(state("n1", labels={"site": "a"}, heartbeat_s=2.0), NOW)
    assert changes.added_nodes == {"n1"}
    for seq, load in enumerate([0.1, 0.2, 0.3]):
        changes = model.apply(beat("n1", seq=seq, load=load), NOW + seq)
        assert changes.nodes == {"n1"}
        assert not changes.added_nodes
    view = model.nodes["n1"]
    assert list(view.loads) == [0.1, 0.2, 0.3]
    assert view.presence(NOW + 2) == "online"
    assert view.age(NOW + 5) == 3
    # 3 missed heartbeats of 2 s: stale; the will makes it offline.
    assert view.presence(NOW + 2 + 6.5) == "stale"
    model.apply(state("n1", online=False), NOW + 10)
    assert view.presence(NOW + 10) == "offline"


def test_a_will_from_an_older_session_does_not_mark_a_newer_one_offline() -> None:
    model = FleetModel()
    model.apply(state("n1", session="new"), NOW)
    changes = model.apply(state("n1", session="old", online=False), NOW + 1)
    assert not changes
    assert model.nodes["n1"].presence(NOW + 1) == "online"
    model.apply(state("n1", session="new", online=False), NOW + 2)
    assert model.nodes["n1"].presence(NOW + 2) == "offline"


def test_a_heartbeat_of_a_new_session_brings_an_offline_node_back() -> None:
    model = FleetModel()
    model.apply(state("n1", session="old", online=False), NOW)
    model.apply(beat("n1", session="new"), NOW + 1)
    view = model.nodes["n1"]
    assert view.presence(NOW + 1) == "online"
    assert view.session == "new"


def test_step_reports_and_snapshots_fill_the_rollout_grid_without_going_backwards() -> None:
    model = FleetModel()
    model.apply(
        JobSnapshot(
            node="n1",
            id="c1",
            rollout="r1",
            action="apply",
            phase="applying",
            steps=[
                StepState(index=0, type="download", state="succeeded"),
                StepState(index=1, type="service"),
                StepState(index=2, type="health"),
            ],
        ),
        NOW,
    )
    changes = model.apply(
        StepStatus(node="n1", command="c1", rollout="r1", index=1, type="service", state="running", ts=NOW),
        NOW,
    )
    assert changes.rollouts == {"r1"}
    rollout = model.rollouts["r1"]
    assert rollout.step_count == 3
    assert [rollout.cell("n1", i).state for i in range(3)] == ["succeeded", "running", "pending"]
    # A late snapshot saying "pending" does not hide the running step.
    model.apply(
        JobSnapshot(
            node="n1",
            id="c1",
            rollout="r1",
            action="apply",
            phase="applying",
            steps=[StepState(index=1, type="service", state="pending")],
        ),
        NOW,
    )
    assert rollout.cell("n1", 1).state == "running"
    # A failure and the rollback that follows.
    model.apply(
        StepStatus(
            node="n1",
            command="c1",
            rollout="r1",
            index=1,
            type="service",
            state="failed",
            ts=NOW + 1,
            detail="exit 1",
        ),
        NOW,
    )
    assert model.nodes["n1"].jobs["c1"].phase == "failed"
    model.apply(
        StepStatus(
            node="n1", command="c2", rollout="r1", index=0, type="download", state="rolled_back", ts=NOW + 2
        ),
        NOW,
    )
    assert rollout.cell("n1", 0).state == "rolled_back"
    assert rollout.cell("n1", 1).detail == "exit 1"
    assert list(model.nodes["n1"].jobs) == ["c1", "c2"]
    assert rollout.node_ids == ["n1"]


def test_per_node_changes_and_bounded_summaries_make_one_node_table() -> None:
    model = FleetModel()
    early = RolloutNodes(
        rollout="r1", seq=1, ts=NOW, nodes={n: NodeSummary(phase="pending") for n in ("a", "b", "c")}
    )
    assert model.apply(early, NOW).rollouts == set()  # nothing to show before the summary
    bounded = RolloutSummary(
        id="r1",
        name="big",
        state="running",
        created_at=1,
        updated_at=2,
        counts=RolloutCounts(pending=2, running=1),
        nodes={"b": NodeSummary(phase="applying", step=0)},
        nodes_total=3,
    )
    assert model.apply(bounded, NOW).rollouts == {"r1"}
    view = model.rollouts["r1"]
    assert view.node_ids == ["a", "b", "c"]
    assert view.summary is not None
    assert view.summary.nodes["b"].phase == "applying"
    changed = RolloutNodes(
        rollout="r1",
        seq=2,
        ts=NOW,
        nodes={
            "a": NodeSummary(phase="succeeded", step=1),
            "c": NodeSummary(phase="failed", detail="exit 1"),
        },
    )
    assert model.apply(changed, NOW).rollouts == {"r1"}
    assert view.progress() == (2, 3)
    assert view.node_line("c") == "c: failed: exit 1"
    # The next bounded summary keeps the rows it does not carry; a complete one replaces them.
    model.apply(bounded.model_copy(update={"nodes": {}, "state": "halted"}), NOW)
    assert view.summary.nodes["a"].phase == "succeeded"
    model.apply(bounded.model_copy(update={"nodes_total": None}), NOW)
    assert view.node_ids == ["b"]


def test_summary_progress_and_list_order() -> None:
    model = FleetModel()
    old = RolloutSummary(
        id="r-old",
        name="old",
        state="succeeded",
        created_at=1,
        updated_at=2,
        counts=RolloutCounts(succeeded=2),
        nodes={"a": NodeSummary(phase="succeeded"), "b": NodeSummary(phase="succeeded")},
    )
    new = RolloutSummary(
        id="r-new",
        name="new",
        state="running",
        created_at=5,
        updated_at=6,
        counts=RolloutCounts(pending=2, running=1, failed=1, rolled_back=1),
        nodes={
            "a": NodeSummary(phase="pending"),
            "b": NodeSummary(phase="pending"),
            "c": NodeSummary(phase="applying"),
            "d": NodeSummary(phase="failed"),  # restored too: counted failed and rolled_back
        },
    )
    model.apply_all([old, new], NOW)
    assert [r.id for r in model.rollouts_newest_first()] == ["r-new", "r-old"]
    assert model.rollouts["r-new"].progress() == (1, 4)
    assert model.rollouts["r-old"].progress() == (2, 2)
    changes = model.apply(Cleared("rollout", "r-old"), NOW)
    assert changes.removed_rollouts == {"r-old"}
    assert "r-old" not in model.rollouts


def test_show_reply_brings_audit_plan_and_summary() -> None:
    model = FleetModel()
    body = {
        "id": "r1",
        "name": "one",
        "state": "rolled_back",
        "created_at": 1.0,
        "updated_at": 2.0,
        "counts": {"rolled_back": 1},
        "nodes": {"n1": {"phase": "rolled_back"}},
        "audit": [{"ts": 1.5, "message": "node n1 failed", "evidence": {"step": 2}}, "junk"],
        "plan": [{"type": "download"}, {"type": "health"}],
    }
    model.set_detail("r1", body)
    view = model.rollouts["r1"]
    assert view.summary is not None
    assert view.summary.state == "rolled_back"
    assert [(a.ts, a.message, a.evidence) for a in view.audit or []] == [(1.5, "node n1 failed", {"step": 2})]
    assert view.step_count == 2
    assert view.step_types == {0: "download", 1: "health"}


def test_log_lines_are_bounded_and_counted() -> None:
    model = FleetModel()
    for i in range(250):
        line = LogLine(node="n1", command="c", rollout="r", index=0, line=f"l{i}", ts=NOW)
        changes = model.apply(line, NOW)
    assert changes.logs == {"n1"}
    assert not changes.nodes
    view = model.nodes["n1"]
    assert view.log_total == 250
    assert len(view.log) == 200
    assert view.log[-1].line == "l249"


def test_filter_matches_words_labels_versions_and_job() -> None:
    model = FleetModel()
    model.apply(
        state("gw-1", labels={"site": "a", "role": "gw"}, inventory=Inventory(packages={"nginx": "1.24"})),
        NOW,
    )
    model.apply(state("sensor-2", labels={"site": "b"}), NOW)
    model.apply(RolloutSummary(id="r1", name="nginx-up", state="running", created_at=1, updated_at=1), NOW)
    model.apply(beat("sensor-2", job=JobRef(rollout="r1", step=1)), NOW)

    def shown(text: str) -> list[str]:
        wanted = parse_filter(text)
        return sorted(n for n, v in model.nodes.items() if model.matches(v, wanted))

    assert shown("") == ["gw-1", "sensor-2"]
    assert shown("site=a") == ["gw-1"]
    assert shown("GW") == ["gw-1"]
    assert shown("nginx=1.24") == []  # key=value is a label test, not a version word
    assert shown("1.24") == ["gw-1"]
    assert shown("nginx-up") == ["sensor-2"]
    assert shown("site=b nginx-up") == ["sensor-2"]
    assert model.job_label(model.nodes["sensor-2"]) == "nginx-up step 2"


def test_sort_keys_order_by_each_column() -> None:
    model = FleetModel()
    model.apply(state("a", heartbeat_s=1.0), NOW)
    model.apply(state("b", online=False), NOW)
    model.apply(state("c", heartbeat_s=1.0), NOW)
    model.apply(beat("a", load=0.2), NOW)
    model.apply(beat("c", load=1.5), NOW - 10)

    def order(column: str) -> list[str]:
        return sorted(model.nodes, key=lambda n: model.sort_key(model.nodes[n], column, NOW))  # type: ignore[arg-type]

    assert order("node") == ["a", "b", "c"]
    assert order("state") == ["b", "c", "a"]  # offline, stale, online
    assert order("load") == ["c", "a", "b"]  # busiest first, unknown last
    assert order("seen") == ["a", "c", "b"]


def test_hub_state_events_and_cleared_nodes() -> None:
    model = FleetModel()
    assert model.apply(HubState(state="online", session="h"), NOW).hub
    changes = model.apply(Event(ts=NOW, kind="wave", message="wave 2"), NOW)
    assert [e.message for e in changes.events] == ["wave 2"]
    model.apply(state("n1"), NOW)
    assert model.apply(Cleared("node", "n1"), NOW).removed_nodes == {"n1"}
    assert not model.apply(Cleared("node", "n1"), NOW)


def test_versions_text_and_cells() -> None:
    inventory = Inventory(services={"api": "2"}, packages={"nginx": "1.24"}, drivers={"wifi": "5"})
    assert versions_text(inventory) == "api=2 nginx=1.24 wifi=5"
    assert [age_text(a) for a in (None, 5, 125, 7300, 200000)] == ["-", "5s", "2m", "2h", "2d"]
    assert str(progress_text(3, 6, width=10)) == "#####----- 3/6"
    assert str(progress_text(0, 0, width=4)) == "---- 0/0"
    assert str(counts_text(RolloutCounts(succeeded=1, pending=2))) == "ok 1 run 0 fail 0 undone 0 wait 2"
    assert [str(step_text(s)) for s in ("pending", "running", "succeeded", "failed", "rolled_back")] == [
        "wait",
        "run",
        "ok",
        "FAIL",
        "undone",
    ]
    assert clock_text(0, utc=True) == "1970-01-01 00:00:00"
