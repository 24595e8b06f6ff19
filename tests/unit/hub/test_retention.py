"""The archive of retired rollouts (hub.retention): durable lines whose ids read back fast."""

from __future__ import annotations

import json
from pathlib import Path

from hub.retention import Archive, archive_path


def record(rollout: str, nodes: int = 3) -> dict[str, object]:
    phases = {f"n{i}": {"phase": "succeeded"} for i in range(nodes)}
    return {"id": rollout, "state": "succeeded", "nodes": phases}


def test_the_archive_sits_beside_the_database() -> None:
    assert archive_path(Path("/var/lib/fleet/hub.json")) == Path("/var/lib/fleet/hub.archive.jsonl")


async def test_lines_hold_record_and_audit_and_are_found_by_id(tmp_path: Path) -> None:
    path = tmp_path / "hub.archive.jsonl"
    archive = Archive(path)
    assert not await archive.holds("r1")  # no archive yet is no error
    await archive.add(record("r1"), [{"rollout": "r1", "kind": "created"}])
    await archive.add(record('r"2', nodes=1000), [])  # ids are checked upstream; quoting still holds
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["rollout"] for line in lines] == ["r1", 'r"2']
    assert json.loads(lines[0])["audit"] == [{"rollout": "r1", "kind": "created"}]
    assert json.loads(lines[1])["record"]["nodes"]["n999"] == {"phase": "succeeded"}
    assert path.stat().st_mode & 0o777 == 0o600

    later = Archive(path)  # a restarted hub finds them in the file
    assert await later.holds("r1")
    assert await later.holds('r"2')
    assert not await later.holds("r")  # a prefix of an archived id is not archived
    assert not await later.holds("n1")  # nor is a value inside a record
