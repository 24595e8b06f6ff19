"""The hub store: mirror reads, group commits, atomic files, clear errors on bad files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bus.errors import ConfigError, FleetError, InvalidInput
from hub.store import AtomicJSONStorage, Store


async def test_put_get_delete_and_all(tmp_path: Path) -> None:
    store = Store(tmp_path / "hub.json")
    await store.open()
    try:
        store.put("rollouts", "r1", {"state": "running", "nodes": ["a"]})
        store.put("rollouts", "r2", {"state": "pending"})
        store.put("rollouts", "r1", {"state": "succeeded"})
        assert store.get("rollouts", "r1") == {"state": "succeeded"}
        assert store.get("rollouts", "nope") is None
        assert store.get("nope", "r1") is None
        assert store.all("rollouts") == [{"state": "succeeded"}, {"state": "pending"}]
        assert store.keys("rollouts") == ["r1", "r2"]
        store.delete("rollouts", "r2")
        store.delete("rollouts", "r2")  # a second delete is a no-op
        assert store.all("rollouts") == [{"state": "succeeded"}]
        assert store.all("executions") == []
    finally:
        await store.close()


async def test_reads_are_copies(tmp_path: Path) -> None:
    store = Store(tmp_path / "hub.json")
    await store.open()
    try:
        doc = {"nested": {"a": 1}}
        store.put("rollouts", "r1", doc)
        doc["nested"]["a"] = 2  # the caller's later change does not leak in
        got = store.get("rollouts", "r1")
        assert got == {"nested": {"a": 1}}
        assert got is not None
        got["nested"]["a"] = 3
        assert store.get("rollouts", "r1") == {"nested": {"a": 1}}
    finally:
        await store.close()


async def test_burst_of_1000_puts_is_a_handful_of_rewrites(tmp_path: Path) -> None:
    path = tmp_path / "hub.json"
    store = Store(path, commit_interval_s=0.05)
    await store.open()
    try:
        for i in range(1000):
            store.put("executions", f"r1:node-{i}", {"phase": "applying", "i": i})
        await store.flush()
        assert 1 <= store.rewrites < 20
        assert store.last_commit_s > 0
        on_disk = json.loads(path.read_text())
        assert len(on_disk["executions"]) == 1000
        assert on_disk["executions"]["r1:node-999"] == {"phase": "applying", "i": 999}
    finally:
        await store.close()


async def test_close_flushes_and_reopen_reads_back(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "hub.json"  # the directory is created
    store = Store(path)
    await store.open()
    store.put("nodes", "n1", {"online": True})
    store.append("audit", {"event": "one"})
    store.append("audit", {"event": "two"})
    await store.close()
    assert not list(path.parent.glob(".hub.json.*.tmp"))

    again = Store(path)
    await again.open()
    try:
        assert again.get("nodes", "n1") == {"online": True}
        assert [d["event"] for d in again.all("audit")] == ["one", "two"]
        key = again.append("audit", {"event": "three"})
        assert key > max(again.keys("audit")[:2])  # keys keep ascending across restarts
        assert [d["event"] for d in again.all("audit")] == ["one", "two", "three"]
    finally:
        await again.close()


async def test_file_is_plain_tinydb_json(tmp_path: Path) -> None:
    path = tmp_path / "hub.json"
    store = Store(path)
    await store.open()
    store.put("rollouts", "r1", {"name": "x", "emoji": "\u00e9"})
    await store.close()
    data = AtomicJSONStorage(path).read()
    assert data == {"rollouts": {"r1": {"name": "x", "emoji": "\u00e9"}}}
    assert oct(path.stat().st_mode & 0o777) == oct(0o600)


async def test_flush_waits_for_puts_made_during_a_commit(tmp_path: Path) -> None:
    path = tmp_path / "hub.json"
    store = Store(path, commit_interval_s=0.01)
    await store.open()
    try:
        for round_ in range(20):
            store.put("rollouts", "r", {"round": round_})
            await store.flush()
            assert json.loads(path.read_text())["rollouts"]["r"] == {"round": round_}
    finally:
        await store.close()


@pytest.mark.parametrize("content", [b"", b"   \n", b"{not json", b"[1, 2]", b'{"rollouts": [1]}'])
async def test_corrupt_or_empty_file_is_a_clear_config_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "hub.json"
    path.write_bytes(content)
    store = Store(path)
    with pytest.raises(ConfigError, match=r"hub database .*hub\.json") as caught:
        await store.open()
    assert "move it aside" in caught.value.reason
    assert path.read_bytes() == content  # nothing was overwritten
    # ...and the lock was released: once fixed, it opens.
    path.unlink()
    await store.open()
    await store.close()


async def test_a_second_store_on_the_same_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "hub.json"
    first = Store(path)
    await first.open()
    try:
        with pytest.raises(ConfigError, match="in use"):
            await Store(path).open()
    finally:
        await first.close()


async def test_bad_documents_fail_at_the_caller(tmp_path: Path) -> None:
    store = Store(tmp_path / "hub.json")
    await store.open()
    try:
        with pytest.raises(InvalidInput):
            store.put("rollouts", "r", {"x": {1, 2}})
        with pytest.raises(InvalidInput):
            store.put("rollouts", "r", {"x": float("nan")})
        with pytest.raises(InvalidInput):
            store.put("rollouts", "r", ["not", "a", "dict"])  # type: ignore[arg-type]
        with pytest.raises(InvalidInput):
            store.put("../etc", "r", {})
        with pytest.raises(InvalidInput):
            store.put("rollouts", "", {})
        assert store.all("rollouts") == []
    finally:
        await store.close()


async def test_write_failure_surfaces_in_flush_and_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "hub.json"
    store = Store(path)
    await store.open()
    monkeypatch.setattr("bus.files.secrets.token_hex", lambda _n: "fixed")
    blocker = tmp_path / ".hub.json.fixed.tmp"
    try:
        blocker.mkdir()  # the temp file cannot be created, even by root
        store.put("rollouts", "r", {"a": 1})
        with pytest.raises(FleetError, match="cannot write hub database"):
            await store.flush()
        assert not path.exists()
        blocker.rmdir()
        await store.flush()  # the committer retried
        assert json.loads(path.read_text()) == {"rollouts": {"r": {"a": 1}}}
    finally:
        if blocker.is_dir():
            blocker.rmdir()
        await store.close()


async def test_writes_before_open_are_a_programming_error(tmp_path: Path) -> None:
    store = Store(tmp_path / "hub.json")
    with pytest.raises(RuntimeError):
        store.put("rollouts", "r", {})


async def test_every_commit_writes_every_table_whether_or_not_it_changed(tmp_path: Path) -> None:
    """A table unchanged since the last commit is written from its last bytes, a changed one
    from its unchanged documents' bytes and the changed ones: the file is always the whole
    mirror (keys that need escaping and text that is not ASCII included)."""
    path = tmp_path / "hub.json"
    store = Store(path, commit_interval_s=0.01)
    await store.open()
    try:
        store.put("nodes", "web-1.example", {"online": True})
        store.put("nodes", 'odd "key" é', {"online": False})
        store.put("rollouts", "r1", {"state": "running"})
        await store.flush()
        for state in ("succeeded", "archived"):
            store.put("rollouts", "r1", {"state": state})  # only the rollouts table changes
            await store.flush()
            assert json.loads(path.read_text()) == {
                "nodes": {"web-1.example": {"online": True}, 'odd "key" é': {"online": False}},
                "rollouts": {"r1": {"state": state}},
            }
        store.delete("nodes", "web-1.example")
        store.put_encoded("rollouts", "r2", '{"state":"running"}')
        await store.flush()
        assert json.loads(path.read_text()) == {
            "nodes": {'odd "key" é': {"online": False}},
            "rollouts": {"r1": {"state": "archived"}, "r2": {"state": "running"}},
        }
        # A table that changed is made again from its documents' kept bytes and the changed ones.
        store.put("nodes", "n2", {"detail": "Grüße 更新"})
        store.put("rollouts", "r2", {"state": "succeeded"})
        await store.flush()
        assert json.loads(path.read_text(encoding="utf-8")) == {
            "nodes": {'odd "key" é': {"online": False}, "n2": {"detail": "Grüße 更新"}},
            "rollouts": {"r1": {"state": "archived"}, "r2": {"state": "succeeded"}},
        }
        with pytest.raises(InvalidInput):
            store.put_encoded("rollouts", "r3", "[1]")
    finally:
        await store.close()
