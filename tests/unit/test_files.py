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
