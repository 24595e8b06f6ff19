"""``fleet rollout``'s human output: counts that tell the truth, steps numbered from 1."""

from __future__ import annotations

from typing import Any

from cli.rollout import render_list, render_show

T0 = 1_700_000_000.0


def summary(**counts: int) -> dict[str, Any]:
    return {
        "id": "1a7e70f1-aaaa",
        "name": "demo-app 2.1",
        "state": "rollback_failed",
        "created_at": T0,
        "updated_at": T0,
        "counts": {"pending": 0, "running": 0, "succeeded": 0, "failed": 0, "rolled_back": 0, **counts},
        "nodes": {
            "node-1": {"phase": "rolled_back", "step": 4, "detail": ""},
            "node-2": {"phase": "rollback_failed", "step": 2, "detail": "restore not verified"},
            "node-3": {"phase": "rolled_back", "step": 2, "detail": "failed step 3 (service): boom"},
        },
    }


def test_list_shows_a_failed_node_as_failed_after_its_restore() -> None:
    text = render_list([summary(failed=1, rolled_back=2, rollback_failed=1)], T0)
    header, row = text.splitlines()
    assert header.split()[:6] == ["ID", "NAME", "STATE", "OK/NODES", "FAILED", "ROLLED"]
    assert "NOT RESTORED" in header
    cells = row.split()
    assert cells[cells.index("rollback_failed") + 1 :][:4] == ["0/3", "1", "2", "1"]


def test_show_numbers_steps_from_one() -> None:
    text = render_show(summary(failed=1), T0)
    node3 = next(line for line in text.splitlines() if line.startswith("node-3"))
    assert node3.split()[:3] == ["node-3", "rolled_back", "3"]


def test_show_prints_the_step_grid_numbered_from_one() -> None:
    body = {
        **summary(failed=1),
        "steps": {
            "node-1": [
                {"index": 0, "type": "download", "state": "rolled_back", "detail": ""},
                {"index": 1, "type": "service", "state": "rolled_back", "detail": ""},
            ],
            "node-3": [
                {"index": 0, "type": "download", "state": "rolled_back", "detail": ""},
                {"index": 1, "type": "service", "state": "failed", "detail": "unsupported hardware rev-a"},
            ],
        },
    }
    lines = render_show(body, T0).splitlines()
    start = lines.index("steps:")
    assert lines[start + 1].split() == ["NODE", "1.download", "2.service"]
    assert lines[start + 3].split() == ["node-3", "undone", "FAIL"]
    assert "  node-3 step 2 (service) failed: unsupported hardware rev-a" in lines
