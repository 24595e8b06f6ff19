"""bus.files.write_atomic: the one durable write, and what a planted link cannot do (issue 16)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bus import files
from bus.signing import generate_keypair


def test_write_atomic_writes_every_byte_with_its_mode_and_leaves_no_temp(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        files.write_atomic(tmp_path / "pub", b"x" * 5_000_000, 0o644)
    finally:
        os.umask(old)
    assert (tmp_path / "pub").read_bytes() == b"x" * 5_000_000
    assert (tmp_path / "pub").stat().st_mode & 0o777 == 0o644  # the umask did not narrow it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pub"]


def test_temp_names_are_random(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    real_open = os.open

    def spy(path: str, flags: int, mode: int = 0o777) -> int:
        seen.append(os.path.basename(path))
        return real_open(path, flags, mode)

    monkeypatch.setattr(os, "open", spy)
    files.write_atomic(tmp_path / "f", b"1")
    files.write_atomic(tmp_path / "f", b"2")
    temps = [name for name in seen if name.endswith(".tmp")]
    assert len(temps) == 2
    assert temps[0] != temps[1]


def test_a_symlink_planted_at_the_temp_name_is_refused_and_its_target_untouched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The attack on `fleet keys generate`: a link at the temp name pointing at a file the
    attacker wants overwritten (or wants to read the key from). Refused, nothing written."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    monkeypatch.setattr("bus.files.secrets.token_hex", lambda _n: "guessed")
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / ".hub.key.guessed.tmp").symlink_to(victim)
    with pytest.raises(FileExistsError):
        generate_keypair(keys)
    assert victim.read_bytes() == b"precious"
    assert not (keys / "hub.key").exists()
    assert (keys / ".hub.key.guessed.tmp").is_symlink()


def test_the_old_fixed_temp_name_no_longer_matters(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / ".hub.key.tmp").symlink_to(victim)  # where keys were written before
    key, _pub = generate_keypair(keys)
    assert victim.read_bytes() == b"precious"
    assert b"PRIVATE KEY" in key.read_bytes()
    assert key.stat().st_mode & 0o777 == 0o600


def test_copy_atomic_copies_every_byte_with_its_mode_and_tag(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.write_bytes(os.urandom(3 * 1024 * 1024 + 17))  # more than one kernel copy call
    dest = tmp_path / "out" / "dest"
    dest.parent.mkdir()
    dest.write_bytes(b"old")
    files.copy_atomic(src, dest, 0o640, tag="fleet-")
    assert dest.read_bytes() == src.read_bytes()
    assert dest.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in dest.parent.iterdir()) == ["dest"]


def test_copy_atomic_of_a_missing_source_changes_nothing(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.write_bytes(b"old")
    with pytest.raises(FileNotFoundError):
        files.copy_atomic(tmp_path / "missing", dest, 0o644)
    assert dest.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest"]


def test_replacing_replaces_only_when_the_block_ends_well(tmp_path: Path) -> None:
    dest = tmp_path / "big.bin"
    dest.write_bytes(b"old")
    seen: list[str] = []

    def half_then_fail() -> None:
        with files.replacing(dest, 0o644, suffix=".part") as fd:
            files.write_all(fd, b"half")
            seen.extend(p.name for p in tmp_path.glob(".big.bin.*.part"))  # the temp file, beside it
            raise RuntimeError("sha256 mismatch")

    with pytest.raises(RuntimeError):
        half_then_fail()
    assert len(seen) == 1
    assert dest.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.bin"]
    with files.replacing(dest, 0o644, suffix=".part") as fd:
        files.write_all(fd, b"new")
    assert dest.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.bin"]
