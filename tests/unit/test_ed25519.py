"""The agents' Ed25519 verifier: system libcrypto and ``cryptography`` give the same answers."""

from __future__ import annotations

import subprocess
import sys

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from bus import ed25519
from bus.ed25519 import PublicKey, public_key_from_pem

LIBCRYPTO = ed25519._libcrypto()
BACKENDS = [pytest.param(ed25519._Cryptography(), id="cryptography")]
if LIBCRYPTO is not None:
    BACKENDS.append(pytest.param(LIBCRYPTO, id="libcrypto"))


def test_this_machine_verifies_without_cryptography() -> None:
    # Debian 12 ships OpenSSL 3: the light path must be the one agents take here.
    assert LIBCRYPTO is not None
    assert ed25519.backend_name() == "libcrypto"


@pytest.mark.parametrize("backend", BACKENDS)
def test_rfc8032_known_answer(backend: ed25519._Backend) -> None:
    key = PublicKey(ed25519._KAT_KEY, backend=backend)
    assert key.verify(ed25519._KAT_SIGNATURE, ed25519._KAT_MESSAGE)
    assert not key.verify(ed25519._KAT_SIGNATURE, b"\x73")
    assert not key.verify(ed25519._KAT_SIGNATURE[:-1] + b"\x01", ed25519._KAT_MESSAGE)
    assert not key.verify(ed25519._KAT_SIGNATURE[:63], ed25519._KAT_MESSAGE)
    assert not key.verify(b"", ed25519._KAT_MESSAGE)


@settings(max_examples=150, deadline=None)
@given(
    seed=st.binary(min_size=32, max_size=32),
    message=st.binary(max_size=600),
    flip=st.integers(min_value=-1, max_value=64 * 8 - 1),
    wrong_message=st.booleans(),
)
def test_both_backends_agree(seed: bytes, message: bytes, flip: int, wrong_message: bool) -> None:
    private = Ed25519PrivateKey.from_private_bytes(seed)
    raw = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    signature = bytearray(private.sign(message))
    if flip >= 0:
        signature[flip // 8] ^= 1 << (flip % 8)
    checked = message + b"!" if wrong_message else message
    expected = flip < 0 and not wrong_message
    answers = {
        name: PublicKey(raw, backend=backend).verify(bytes(signature), checked)
        for name, backend in [("cryptography", ed25519._Cryptography()), ("libcrypto", LIBCRYPTO)]
        if backend is not None
    }
    assert set(answers.values()) == {expected}, answers


def test_pem_blocks() -> None:
    private = Ed25519PrivateKey.generate()
    pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    key = public_key_from_pem(pem)
    assert key.verify(private.sign(b"hello"), b"hello")
    assert key == public_key_from_pem(pem.replace(b"\n", b"\r\n"))
    with pytest.raises(ValueError, match="not a PEM"):
        public_key_from_pem(b"hello")
    with pytest.raises(ValueError, match="not base64"):
        public_key_from_pem(b"-----BEGIN PUBLIC KEY-----\n!!!\n-----END PUBLIC KEY-----\n")
    from cryptography.hazmat.primitives.asymmetric import ec

    p256 = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(ValueError, match="not an Ed25519"):
        public_key_from_pem(p256)
    with pytest.raises(ValueError, match="32 bytes"):
        PublicKey(b"short")


def test_an_agent_never_loads_cryptography() -> None:
    # The whole agent, ready to verify a command, without the 6 MiB library.
    code = (
        "import sys, cli.agent, edge_agent.service, edge_agent.intake\n"
        "from bus import ed25519\n"
        "assert ed25519.PublicKey(ed25519._KAT_KEY).verify(ed25519._KAT_SIGNATURE, ed25519._KAT_MESSAGE)\n"
        "print(sorted(m for m in sys.modules if m.startswith('cryptography')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
