"""The pure parts of standby hubs (hub.standby): who is active, the term file, rollout records."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bus.errors import InvalidInput
from bus.messages import MAX_PAYLOAD_BYTES, Command, HubState, RolloutSpec
from bus.topics import Topics
from hub.core.engine import RolloutEngine
from hub.core.events import RolloutCreated
from hub.core.state import EncodedRecord
from hub.standby import (
    ActiveView,
    RecordSplitter,
    TermFile,
    decode_record,
    encode_record,
    lock_client_id,
    term_path,
)


def state(kind: str, hub: str, term: int, reason: str = "birth") -> HubState:
    return HubState.model_validate(
        {"state": kind, "session": f"s-{hub}", "hub": hub, "term": term, "reason": reason}
    )


def test_no_state_on_the_broker_is_a_vacant_place() -> None:
    assert ActiveView().vacant(0.0) == "no hub state on the broker"


def test_an_active_hub_holds_the_place_while_it_beats() -> None:
    view = ActiveView(dead_after_s=4.0)
    view.on_state(state("active", "a", 3), now=10.0)
    assert view.active_hub() == "a"
    assert view.vacant(13.0) is None
    view.on_member("a", state("active", "a", 3), now=13.0)  # a heartbeat
    assert view.vacant(16.5) is None
    assert view.vacant(17.5) == "hub a silent for 4.5 s"


def test_the_will_of_the_active_hub_frees_the_place_at_once() -> None:
    view = ActiveView()
    view.on_state(state("active", "a", 3), now=10.0)
    view.on_state(state("offline", "a", 3, reason="lost"), now=10.5)
    assert view.vacant(10.5) == "hub a is offline (lost)"


def test_a_late_will_of_an_older_hub_is_stale() -> None:
    view = ActiveView()
    view.on_state(state("active", "b", 4), now=10.0)
    view.on_state(state("offline", "a", 3, reason="lost"), now=10.1)
    assert view.vacant(10.2) is None
    assert view.active_hub() == "b"
    assert view.max_term == 4


def test_heartbeats_of_another_hub_do_not_keep_the_active_one_alive() -> None:
    view = ActiveView(dead_after_s=4.0)
    view.on_state(state("active", "a", 3), now=10.0)
    view.on_member("b", state("standby", "b", 3), now=14.0)
    view.on_member("c", state("active", "c", 2), now=14.0)  # an old record
    assert view.vacant(14.5) is not None


def test_the_retained_active_state_of_this_very_hub_is_its_own_past() -> None:
    view = ActiveView(me="a")
    view.on_state(state("active", "a", 3), now=10.0)
    assert view.vacant(10.0) == "the hub state left on the broker is this hub's own, from before"


def test_the_term_file_is_durable_and_tolerant(tmp_path: Path) -> None:
    terms = TermFile(term_path(tmp_path / "hub.json"))
    assert terms.path == tmp_path / "hub.json.term"
    assert terms.read() == 0
    terms.write(7)
    assert TermFile(terms.path).read() == 7
    assert terms.path.stat().st_mode & 0o777 == 0o600
    terms.path.write_text("seven")
    assert terms.read() == 0


def test_one_lock_id_per_fleet() -> None:
    assert lock_client_id("fleet/v1") == lock_client_id("fleet/v1")
    assert lock_client_id("fleet/v1") != lock_client_id("other/v1")
    assert lock_client_id("fleet/v1").startswith("active-")


def test_a_record_round_trips_and_its_audit_tail_shrinks_to_fit() -> None:
    record = {"id": "r1", "nodes": {"n1": {"phase": "running"}}}
    audit = [{"rollout": "r1", "message": "x" * 1000, "n": i} for i in range(50)]
    data = encode_record(record, audit)
    assert data is not None
    assert decode_record(data) == (record, audit)
    big = [{"rollout": "r1", "message": "x" * 20_000, "n": i} for i in range(50)]
    data = encode_record(record, big)
    assert data is not None
    assert len(data) <= MAX_PAYLOAD_BYTES
    got, tail = decode_record(data)
    assert got == record
    assert 0 < len(tail) < 50
    assert tail[-1]["n"] == 49  # the latest entries stay
    assert encode_record({"id": "r1", "pad": "x" * MAX_PAYLOAD_BYTES}, []) is None


def test_a_malformed_record_is_refused() -> None:
    with pytest.raises(InvalidInput):
        decode_record(json.dumps({"record": [], "audit": []}).encode())
    with pytest.raises(InvalidInput):
        decode_record(b"not json")


def test_topics_of_membership_and_records() -> None:
    topics = Topics("fleet/v1")
    assert topics.hub_member("hub-a") == "fleet/v1/hub/member/hub-a"
    assert topics.parse_hub_member("fleet/v1/hub/member/hub-a") == "hub-a"
    assert topics.parse_hub_member("fleet/v1/hub/state") is None
    assert topics.rollout_record("r1") == "fleet/v1/rollout/r1/record"
    assert topics.parse_rollout_record("fleet/v1/rollout/r1/record") == "r1"
    assert topics.parse_rollout("fleet/v1/rollout/r1/record") is None  # summaries stay apart
    with pytest.raises(InvalidInput):
        topics.hub_member("a/b")


def test_the_term_of_a_command_is_left_out_of_the_wire_when_zero() -> None:
    fields = {
        "id": "c1",
        "node": "n1",
        "rollout": "r1",
        "action": "abort",
        "issued_at": 1.0,
        "expires_at": 2.0,
    }
    assert "term" not in Command.model_validate(fields).model_dump(mode="json")
    assert Command.model_validate({**fields, "term": 3}).model_dump(mode="json")["term"] == 3


def big_record(nodes: int, detail: str = "") -> dict[str, Any]:
    """A record like the engine's at scale (about 500 bytes a node)."""
    return {
        "id": "r1",
        "state": "running",
        "waves": [[f"n{i:05d}" for i in range(nodes)]],
        "nodes": {
            f"n{i:05d}": {"phase": "applying", "step": 1, "detail": detail or "x" * 450, "grid": [["ok", ""]]}
            for i in range(nodes)
        },
    }


def encoded(record: dict[str, Any]) -> EncodedRecord:
    """``record`` as ``hub.core.state.RecordEncoder`` gives it."""
    nodes = {name: f"{json.dumps(name)}:{json.dumps(doc)}" for name, doc in record["nodes"].items()}
    return EncodedRecord({k: v for k, v in record.items() if k != "nodes"}, nodes)


def test_a_small_record_goes_whole_and_again_only_when_it_changed() -> None:
    splitter = RecordSplitter()
    record = big_record(3)
    first = splitter.payloads("r1", encoded(record), [])
    assert first is not None
    assert first.parts == {}
    assert first.head is not None
    assert decode_record(first.head) == (record, [])
    same = splitter.payloads("r1", encoded(record), [])
    assert same is not None
    assert (same.parts, same.head) == ({}, None)


def test_a_record_of_ten_thousand_nodes_goes_in_parts_and_only_changed_parts_go_again() -> None:
    splitter = RecordSplitter()
    record = big_record(10_000)
    audit = [{"rollout": "r1", "message": "created", "n": 0}]
    first = splitter.payloads("r1", encoded(record), audit)
    assert first is not None
    assert first.head is not None
    assert len(first.parts) > 1
    assert all(len(part) <= MAX_PAYLOAD_BYTES for part in first.parts.values())
    assert decode_record(first.head, first.parts) == (record, audit)

    nodes = dict(record["nodes"])
    nodes["n07777"] = {**nodes["n07777"], "phase": "succeeded"}
    changed = {**record, "nodes": nodes}
    second = splitter.payloads("r1", encoded(changed), audit)
    assert second is not None
    assert second.head is None  # the head names no node: unchanged
    assert len(second.parts) == 1
    merged = {**first.parts, **second.parts}
    assert decode_record(first.head, merged) == (changed, audit)
    # A reader missing a part, or holding one of another layout, refuses the record.
    missing = {k: v for k, v in merged.items() if k != 3}
    with pytest.raises(InvalidInput, match="part 3 of"):
        decode_record(first.head, missing)
    other = {**merged, 2: json.dumps({"v": 1, "per_part": 7, "nodes": {}}).encode()}
    with pytest.raises(InvalidInput, match="part 2 is of another layout"):
        decode_record(first.head, other)


def test_parts_shrink_while_a_part_is_too_big_and_a_node_too_big_for_any_is_said() -> None:
    splitter = RecordSplitter(part_nodes=500)
    record = big_record(40, detail="y" * 60_000)
    payloads = splitter.payloads("r1", encoded(record), [])
    assert payloads is not None
    assert payloads.head is not None
    assert all(len(part) <= MAX_PAYLOAD_BYTES for part in payloads.parts.values())
    assert len(payloads.parts) >= 10  # at most four such nodes a part
    assert decode_record(payloads.head, payloads.parts)[0] == record
    assert splitter.payloads("r2", encoded(big_record(2, detail="z" * MAX_PAYLOAD_BYTES)), []) is None
    splitter.forget("r1")
    assert splitter.used_parts("r1") == 0


def test_an_engine_record_of_ten_thousand_listed_targets_round_trips_in_parts() -> None:
    """The targets and the waves name every node too: they travel in text pieces."""
    nodes = [f"sim-a-{i:05d}" for i in range(10_000)]
    spec = RolloutSpec.model_validate(
        {
            "name": "ten thousand",
            "targets": nodes,
            "plan": [{"type": "package", "manager": "apt", "name": "app", "version": "2.0"}],
            "strategy": {"waves": ["10%"]},
        }
    )
    engine = RolloutEngine()
    engine.handle(RolloutCreated("r1", spec, tuple(nodes), frozenset(nodes)), 1000.0)
    payloads = RecordSplitter().payloads("r1", engine.encoded_record("r1"), [{"message": "created"}])
    assert payloads is not None
    assert payloads.head is not None
    assert len(payloads.head) < 4096
    assert all(len(part) <= MAX_PAYLOAD_BYTES for part in payloads.parts.values())
    assert decode_record(payloads.head, payloads.parts) == (engine.record("r1"), [{"message": "created"}])
