"""Deterministic demo data for the TUI: snapshots, tests, and ``python -m tui.demo``."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any, Literal

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
    Reply,
    Request,
    RolloutCounts,
    RolloutSummary,
    StepState,
    StepStatus,
)
from tui.config import TuiConfig
from tui.feed import ListFeed
from tui.model import BusUpdate

__all__ = ["DEMO_NOW", "demo_responder", "demo_updates", "main", "node_id"]

#: The demo's fixed "now" (2024-05-01 12:00:00 UTC).
DEMO_NOW = 1714564800.0
ROLLOUT_ID = "r-2f6c1a"
FAILED_ID = "r-9b0d44"
PLAN_TYPES = ("download", "service", "package", "service", "health")


def node_id(index: int) -> str:
    """Name of demo node ``index`` (1-based)."""
    return f"edge-{index:03d}"


def _state(index: int, now: float) -> NodeState:
    site = "abc"[index % 3]
    return NodeState(
        node=node_id(index),
        state="offline" if index % 7 == 0 else "online",
        session=f"s-{index}",
        reason="lost" if index % 7 == 0 else "birth",
        agent_version="0.1.0",
        started_at=now - 3600,
        labels={"site": site, "role": "gateway" if index % 4 == 1 else "sensor"},
        inventory=Inventory(
            services={"collector": "1.4.2" if index > 3 else "1.5.0"},
            packages={"nginx": "1.22.1", "fleet-agent": "0.1.0"},
            drivers={"wifi-rt": "5.10"},
            os={"id": "debian", "version": "12"},
        ),
        heartbeat_s=5.0,
    )


def _heartbeat(index: int, seq: int, now: float) -> Heartbeat:
    job = JobRef(rollout=ROLLOUT_ID, command=f"c-{index}", step=2) if index in (4, 5) else None
    return Heartbeat(
        node=node_id(index),
        session=f"s-{index}",
        seq=seq,
        ts=now,
        uptime_s=3600 + seq * 5,
        load1=round(((index * 37 + seq * 11) % 300) / 100, 2),
        mem_used_pct=float((index * 13 + seq) % 90 + 5),
        disk_free_pct=float((index * 29) % 80 + 10),
        job=job,
    )


def _step_state(index: int, done: int) -> Literal["succeeded", "running", "pending"]:
    if index < done:
        return "succeeded"
    return "running" if index == done else "pending"


def _rollouts(now: float) -> list[BusUpdate]:
    running = RolloutSummary(
        id=ROLLOUT_ID,
        name="collector-1.5",
        state="running",
        created_at=now - 300,
        updated_at=now - 5,
        counts=RolloutCounts(pending=1, running=2, succeeded=3),
        nodes={
            node_id(1): NodeSummary(phase="succeeded"),
            node_id(2): NodeSummary(phase="succeeded"),
            node_id(3): NodeSummary(phase="succeeded"),
            node_id(4): NodeSummary(phase="applying", step=2),
            node_id(5): NodeSummary(phase="applying", step=2),
            node_id(6): NodeSummary(phase="pending"),
        },
        wave=2,
        waves=3,
    )
    failed = RolloutSummary(
        id=FAILED_ID,
        name="wifi-driver-5.11",
        state="rolled_back",
        created_at=now - 7200,
        updated_at=now - 6900,
        counts=RolloutCounts(failed=1, rolled_back=1),
        nodes={
            node_id(8): NodeSummary(phase="failed", step=3, detail="health check failed"),
            node_id(9): NodeSummary(phase="rolled_back"),
        },
        wave=1,
        waves=1,
        detail="edge-008 failed step 4 (health): coordinated rollback done",
    )
    updates: list[BusUpdate] = [running, failed]
    for index in range(1, 6):
        done = 5 if index <= 3 else 2
        steps = [
            StepState(index=i, type=kind, state=_step_state(i, done)) for i, kind in enumerate(PLAN_TYPES)
        ]
        updates.append(
            JobSnapshot(
                node=node_id(index),
                id=f"c-{index}",
                rollout=ROLLOUT_ID,
                action="apply",
                phase="succeeded" if index <= 3 else "applying",
                steps=steps,
                issued_at=now - 300,
                updated_at=now - 10,
            )
        )
    for index, state in ((8, "failed"), (9, "rolled_back")):
        updates.append(
            StepStatus(
                node=node_id(index),
                command=f"c-{index}-x",
                rollout=FAILED_ID,
                index=3,
                type="health",
                state=state,
                ts=now - 6950,
                detail="health check failed" if state == "failed" else "",
            )
        )
    for number, text in enumerate(
        [
            "fetching collector_1.5.0_amd64.deb",
            "sha256 ok (2.1 MiB)",
            "stopping collector.service",
            "Unpacking collector (1.5.0) over (1.4.2) ...",
            "Setting up collector (1.5.0) ...",
        ]
    ):
        updates.append(
            LogLine(
                node=node_id(4),
                command="c-4",
                rollout=ROLLOUT_ID,
                index=min(number // 2, 2),
                line=text,
                ts=now - 60 + number,
            )
        )
    return updates


def demo_updates(nodes: int = 12, now: float = DEMO_NOW, heartbeats: int = 3) -> list[BusUpdate]:
    """A fleet of ``nodes`` nodes (every 7th offline), two rollouts, logs and events."""
    updates: list[BusUpdate] = [
        HubState(state="online", session="hub-1", version="0.1.0", started_at=now - 86400)
    ]
    updates.extend(_state(i, now) for i in range(1, nodes + 1))
    for seq in range(heartbeats):
        updates.extend(_heartbeat(i, seq, now) for i in range(1, nodes + 1) if i % 7)
    updates.extend(_rollouts(now))
    updates.append(
        Event(ts=now - 5, kind="wave", message="collector-1.5: wave 2 of 3 started", rollout=ROLLOUT_ID)
    )
    return updates


_AUDIT: list[dict[str, Any]] = [
    {"ts": DEMO_NOW - 300, "message": "created by fleet-tui", "evidence": {"targets": 6}},
    {"ts": DEMO_NOW - 299, "message": "wave 1 started", "evidence": {"nodes": ["edge-001", "edge-002"]}},
    {
        "ts": DEMO_NOW - 120,
        "message": "wave 2 started",
        "evidence": {"nodes": ["edge-003", "edge-004", "edge-005"]},
    },
]


def demo_responder(request: Request) -> Reply:
    """Answers like a hub would: ``show`` with an audit trail, ``create_rollout`` with an id."""
    if request.op == "show":
        rollout = request.body.get("rollout")
        summary = next(
            (u for u in _rollouts(DEMO_NOW) if isinstance(u, RolloutSummary) and u.id == rollout), None
        )
        if summary is None:
            return Reply(request=request.id, ok=False, error=f"unknown rollout {rollout}")
        body = summary.model_dump(mode="json")
        body["audit"] = _AUDIT if rollout == ROLLOUT_ID else []
        return Reply(request=request.id, ok=True, body=body)
    if request.op == "create_rollout":
        return Reply(request=request.id, ok=True, body={"rollout": "r-new"})
    return Reply(request=request.id, ok=True, body={})


def main(argv: Sequence[str] | None = None) -> int:
    """Run the TUI on demo data (no broker needed)."""
    from tui.app import make_app

    parser = argparse.ArgumentParser(description="The fleet TUI on deterministic demo data.")
    parser.add_argument("--nodes", type=int, default=12)
    parser.add_argument("--live", action="store_true", help="use the real clock (ages grow)")
    args = parser.parse_args(argv)
    feed = ListFeed(demo_updates(args.nodes), responder=demo_responder)
    config = TuiConfig(broker="demo://", prefix="fleet/v1", utc=True)
    app = make_app(config, feed, clock=time.time if args.live else (lambda: DEMO_NOW))
    app.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
