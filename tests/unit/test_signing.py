"""Canonical JSON and Ed25519 command signatures (DESIGN section 2), against a golden fixture."""

from __future__ import annotations

import base64
import json
import math
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from bus.errors import ConfigError, SignatureError
from bus.messages import Command, ScriptStep, ServiceStep, decode, encode, loads_object
from bus.signing import (
    CommandSigner,
    canonical_json,
    generate_keypair,
    load_private_key,
    load_public_keys,
    public_key_of,
    sign_command,
    verify_fields,
)

FIXTURES = Path(__file__).parent / "fixtures"
#: The golden command was signed with this key (a fixed seed: Ed25519 signatures are deterministic).
GOLDEN_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))


@pytest.fixture
def golden() -> dict[str, Any]:
    fields: dict[str, Any] = json.loads((FIXTURES / "command.json").read_text(encoding="utf-8"))
    return fields


def unsigned(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if k != "sig"}


def test_canonical_json_matches_the_golden_bytes(golden: dict[str, Any]) -> None:
    expected = (FIXTURES / "command.canonical").read_bytes()
    assert canonical_json(unsigned(golden)) == expected
    # What those bytes are: sorted keys, no spaces, UTF-8 (not \u escapes), no newline.
    assert expected.startswith(b'{"action":"apply","expires_at":1717203600.0,"id":')
    assert "Grüße, 更新".encode() in expected
    assert b" " not in expected.replace("Grüße, 更新".encode(), b"")
    assert not expected.endswith(b"\n")


def test_golden_signature_verifies_and_is_reproduced(golden: dict[str, Any]) -> None:
    verify_fields(golden, [public_key_of(GOLDEN_KEY)])
    # The hub's path (model -> sign) makes exactly the golden fields, signature included.
    command = Command.model_validate(unsigned(golden))
    assert sign_command(command, GOLDEN_KEY).model_dump(mode="json") == golden


def test_canonical_json_sorts_nested_keys_and_refuses_nan() -> None:
    assert canonical_json({"b": {"z": 1, "a": [2, {"y": 0, "x": None}]}, "a": "é"}) == (
        '{"a":"é","b":{"a":[2,{"x":null,"y":0}],"z":1}}'.encode()
    )
    with pytest.raises(ValueError, match="Out of range float"):
        canonical_json({"t": math.nan})


@given(st.dictionaries(st.text(max_size=8), st.integers() | st.text(max_size=8) | st.none(), max_size=6))
def test_canonical_json_ignores_key_order(fields: dict[str, Any]) -> None:
    reordered = dict(reversed(list(fields.items())))
    assert canonical_json(reordered) == canonical_json(fields)
    assert json.loads(canonical_json(fields)) == fields


def make_command(**changes: Any) -> Command:
    fields: dict[str, Any] = {
        "id": "c-1",
        "node": "n1",
        "rollout": "r-1",
        "action": "apply",
        "issued_at": 1000.0,
        "expires_at": 2000.0,
        "plan": [ServiceStep(action="restart", name="app")],
    }
    fields.update(changes)
    return Command(**fields)


def test_sign_and_verify_round_trip_through_the_wire() -> None:
    key = Ed25519PrivateKey.generate()
    signed = sign_command(make_command(), key)
    assert signed.sig
    # The agent verifies the raw received object, before any model validation.
    received = loads_object(encode(signed))
    verify_fields(received, [public_key_of(Ed25519PrivateKey.generate()), public_key_of(key)])
    assert decode(Command, encode(signed)) == signed


def test_the_signer_makes_the_golden_command(golden: dict[str, Any]) -> None:
    payload = CommandSigner(GOLDEN_KEY).payload(Command.model_validate(unsigned(golden)))
    assert loads_object(payload) == golden
    # The bytes signed are the canonical text itself: the payload is it with sig added.
    canonical = (FIXTURES / "command.canonical").read_bytes()
    assert payload == canonical[:-1] + b',"sig":"' + golden["sig"].encode() + b'"}'


def test_the_signer_agrees_with_sign_command_for_every_command_of_a_plan() -> None:
    """One plan for many nodes (its text made once), terms, extensions, commands without a plan."""
    key = Ed25519PrivateKey.generate()
    signer = CommandSigner(key, keep=2)
    plan = [ServiceStep(action="restart", name="app"), ServiceStep(action="stop", name="db", timeout_s=5)]
    # A text that looks like the marker the plan's text replaces stays a text.
    other = [ScriptStep(name="install_update.sh", args=['"plan":null', 'Grüße "quoted"'])]
    commands = [
        make_command(node="n1", plan=plan),
        make_command(node="n2", id="c-2", plan=plan, defer_until=1500.0),
        make_command(node="n3", id="c-3", plan=other),
        make_command(node="n4", id="c-4", action="abort", plan=[]),
        make_command(node="n5", id="c-5", plan=plan),  # its text made again: keep=2 dropped it
    ]
    for command in commands:
        for term in (0, 7):
            payload = signer.payload(command, term)
            expected = sign_command(command.model_copy(update={"term": term}), key)
            assert loads_object(payload) == expected.model_dump(mode="json")
            verify_fields(loads_object(payload), [public_key_of(key)])
            assert decode(Command, payload) == expected
            assert (b'"term":' in payload) == bool(term)


def test_a_plan_changed_in_place_is_not_served_from_the_kept_text() -> None:
    """The kept text is found by the steps' identity: new steps (a new plan) get a new text."""
    key = Ed25519PrivateKey.generate()
    signer = CommandSigner(key)
    first = signer.payload(make_command(plan=[ServiceStep(action="restart", name="app")]))
    second = signer.payload(make_command(plan=[ServiceStep(action="restart", name="other")]))
    assert loads_object(first)["plan"][0]["name"] == "app"
    assert loads_object(second)["plan"][0]["name"] == "other"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("node", "n2"),  # a command copied to another node
        ("expires_at", 9_999_999_999.0),
        ("action", "rollback"),
        ("plan", [{"type": "service", "action": "restart", "name": "evil", "timeout_s": None}]),
        ("extra", "field"),
    ],
)
def test_tampered_field_fails(field: str, value: Any) -> None:
    key = Ed25519PrivateKey.generate()
    fields = sign_command(make_command(), key).model_dump(mode="json")
    fields[field] = value
    with pytest.raises(SignatureError, match="does not verify"):
        verify_fields(fields, [public_key_of(key)])


def test_dropped_field_fails() -> None:
    key = Ed25519PrivateKey.generate()
    fields = sign_command(make_command(), key).model_dump(mode="json")
    del fields["expires_at"]
    with pytest.raises(SignatureError):
        verify_fields(fields, [public_key_of(key)])


def test_key_not_trusted_fails(golden: dict[str, Any]) -> None:
    with pytest.raises(SignatureError, match="any trusted key"):
        verify_fields(golden, [public_key_of(Ed25519PrivateKey.generate())])
    with pytest.raises(SignatureError):
        verify_fields(golden, [])


@pytest.mark.parametrize(
    ("sig", "reason"),
    [
        (None, "not signed"),
        ("", "not signed"),
        (42, "not signed"),
        ("not base64!", "not valid base64"),
        (base64.b64encode(b"short").decode(), "does not verify"),
    ],
)
def test_missing_or_malformed_signature_fails(golden: dict[str, Any], sig: Any, reason: str) -> None:
    fields = dict(golden)
    if sig is None:
        del fields["sig"]
    else:
        fields["sig"] = sig
    with pytest.raises(SignatureError, match=reason):
        verify_fields(fields, [public_key_of(GOLDEN_KEY)])


def test_key_files_round_trip(tmp_path: Path) -> None:
    key_path, pub_path = generate_keypair(tmp_path / "keys")
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    key = load_private_key(key_path)
    signed = sign_command(make_command(), key)
    # A trust file may hold several keys (key rotation); any of them will do.
    other = tmp_path / "other"
    _, other_pub = generate_keypair(other)
    trust = tmp_path / "trust.pem"
    trust.write_bytes(other_pub.read_bytes() + pub_path.read_bytes())
    keys = load_public_keys(trust)
    assert len(keys) == 2
    verify_fields(signed.model_dump(mode="json"), keys)


def test_bad_key_files_are_config_errors(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a key\n")
    with pytest.raises(ConfigError):
        load_private_key(junk)
    with pytest.raises(ConfigError, match="holds no public key"):
        load_public_keys(junk)
    with pytest.raises(ConfigError, match="cannot read"):
        load_public_keys(tmp_path / "missing.pem")
