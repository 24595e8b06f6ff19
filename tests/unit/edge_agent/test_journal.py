"""The journal file: atomic writes, a torn temp file never replaces the journal."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest

from edge_agent import executor
from edge_agent.executor import JournalState
from edge_agent.journal import Journal, write_atomic


def state(n: int) -> JournalState:
    return executor.remember(JournalState(), f"command-{n}", float(n))


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    store = Journal(tmp_path / "state" / "journal.json")
    assert store.load() == JournalState()  # no journal yet: a fresh start
    store.save(state(1))
    assert store.load() == state(1)
    assert sorted(p.name for p in store.path.parent.iterdir()) == ["journal.json"]  # no temp left behind
    assert store.path.stat().st_mode & 0o777 == 0o600


def test_a_torn_temp_file_from_a_crash_never_replaces_the_journal(tmp_path: Path) -> None:
    store = Journal(tmp_path / "journal.json")
    store.save(state(1))
    # A crash in the middle of the next write leaves a half-written temp file.
    full = state(2).model_dump_json().encode()
    (tmp_path / ".journal.json.0123456789abcdef.tmp").write_bytes(full[: len(full) // 2])

    assert store.load() == state(1)
    store.save(state(3))  # the next write goes through a temp file of its own
    assert store.load() == state(3)


@pytest.mark.parametrize("failing", ["write", "fsync", "replace"])
def test_a_write_that_fails_half_way_leaves_the_old_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    store = Journal(tmp_path / "journal.json")
    store.save(state(1))

    def broken(*_args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, failing, broken)
    with pytest.raises(OSError, match="No space left"):
        store.save(state(2))
    monkeypatch.undo()

    assert store.load() == state(1)
    assert not list(tmp_path.glob(".journal.json.*.tmp"))


def test_write_atomic_syncs_the_data_before_the_rename_and_the_directory_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        calls.append("fsync-dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "fsync-file")
        real_fsync(fd)

    def replace(src: str | Path, dst: str | Path) -> None:
        calls.append("replace")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    write_atomic(tmp_path / "f", b"data")
    assert calls == ["fsync-file", "replace", "fsync-dir"]
    assert (tmp_path / "f").read_bytes() == b"data"


def test_an_unreadable_journal_is_moved_aside_and_the_agent_starts_afresh(tmp_path: Path) -> None:
    store = Journal(tmp_path / "journal.json")
    store.path.write_text('{"v": 1, "seen": "not a list"}')
    assert store.load() == JournalState()
    aside = [p.name for p in tmp_path.iterdir() if p.name.startswith("journal.json.corrupt-")]
    assert len(aside) == 1
    assert not store.path.exists()


def test_a_journal_of_many_jobs_reads_back_after_every_write(tmp_path: Path) -> None:
    # The encoder reuses the JSON of unchanged entries: every write must still hold
    # exactly the state it was given, whichever entries changed, appeared or went.
    from bus.messages import Command, ScriptStep

    store = Journal(tmp_path / "journal.json")
    current = JournalState()
    for n in range(executor.MAX_APPLIES + 5):
        command = Command(
            id=f"c{n}",
            node="n1",
            rollout=f"r{n % (executor.MAX_APPLIES + 2)}",  # a rollout applied again replaces its entry
            action="apply",
            issued_at=1000.0 + n,
            expires_at=5000.0 + n,
            plan=[ScriptStep(name="a.sh"), ScriptStep(name="b.sh", args=['quote " and \\ and ü'])],
        )
        for transition in (
            functools.partial(executor.remember, command_id=command.id, issued_at=command.issued_at),
            functools.partial(executor.begin, command=command),
            functools.partial(executor.update_step, rollout=command.rollout, index=0, state="running"),
            functools.partial(
                executor.update_step, rollout=command.rollout, index=0, state="succeeded", record={"old": [1]}
            ),
            executor.finish,
        ):
            current = transition(current)
            store.save(current)
            assert store.load() == current
    assert len(current.applies) == executor.MAX_APPLIES
