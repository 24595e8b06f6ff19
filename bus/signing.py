"""Canonical JSON and Ed25519 signatures of commands (DESIGN section 2).

``sig`` is Ed25519 over the canonical JSON (sorted keys, no spaces, UTF-8) of
every other field of the command. Agents verify over the fields *as received*
(before model validation) so hub and agent never disagree about defaults.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel

from bus.ed25519 import PublicKey, public_key_from_pem
from bus.errors import ConfigError, SignatureError
from bus.files import write_atomic
from bus.messages import Command

if TYPE_CHECKING:  # the hub's side; agents only verify and never load ``cryptography``
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

#: A message with a ``sig`` field: a command, an active hub state.
Signable = TypeVar("Signable", bound=BaseModel)

__all__ = [
    "CommandSigner",
    "canonical_json",
    "generate_keypair",
    "load_private_key",
    "load_public_keys",
    "public_key_of",
    "sign_command",
    "sign_model",
    "verify_fields",
]


def canonical_json(fields: Mapping[str, Any]) -> bytes:
    """Sorted keys, no spaces, UTF-8: the bytes that get signed."""
    return json.dumps(
        fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def _signed_part(fields: Mapping[str, Any]) -> bytes:
    return canonical_json({k: v for k, v in fields.items() if k != "sig"})


def sign_command(command: Command, key: Ed25519PrivateKey) -> Command:
    """Return ``command`` with ``sig`` set."""
    return sign_model(command, key)


class CommandSigner:
    """Signs commands straight into their wire payload (the hub's many commands of one plan).

    ``encode(sign_command(command, key))`` costs two model copies, a dump and a
    JSON encoding of the whole plan per command; a rollout sends the same plan
    to every node. Here the plan's canonical JSON is made once per plan (its
    steps by identity, the newest ``keep`` plans), the rest of the command is
    dumped once, and the payload is the signed canonical text with ``sig``
    added: an agent reads the same fields and verifies the same bytes.
    """

    def __init__(self, key: Ed25519PrivateKey, keep: int = 16) -> None:
        self._key = key
        self._keep = keep
        # (ids of the steps) -> (the steps, kept so the ids stay theirs; their canonical JSON)
        self._plans: dict[tuple[int, ...], tuple[list[Any], str]] = {}

    def payload(self, command: Command, term: int = 0) -> bytes:
        """The signed ``command`` (with ``term`` when not 0) as UTF-8 JSON, ready to publish."""
        fields = command.model_dump(mode="json", exclude={"plan", "sig", "term"})
        if term or command.term:
            fields["term"] = term or command.term
        fields["plan"] = None
        text = canonical_json(fields).decode("utf-8")
        # "plan":null is there once: inside a JSON string every quote is escaped.
        signed = text.replace('"plan":null', '"plan":' + self._plan_text(command), 1).encode("utf-8")
        sig = base64.b64encode(self._key.sign(signed)).decode("ascii")
        return signed[:-1] + b',"sig":"' + sig.encode("ascii") + b'"}'

    def _plan_text(self, command: Command) -> str:
        key = tuple(map(id, command.plan))
        kept = self._plans.get(key)
        if kept is None:
            plan = command.model_dump(mode="json", include={"plan"})["plan"]
            kept = (list(command.plan), canonical_json(plan).decode("utf-8"))
            if len(self._plans) >= self._keep:
                del self._plans[next(iter(self._plans))]
            self._plans[key] = kept
        return kept[1]


def sign_model(message: Signable, key: Ed25519PrivateKey) -> Signable:
    """Return ``message`` (a model with a ``sig`` field: a command, an active hub state) signed."""
    fields = message.model_dump(mode="json")
    sig = key.sign(_signed_part(fields))
    return message.model_copy(update={"sig": base64.b64encode(sig).decode("ascii")})


def verify_fields(fields: Mapping[str, Any], keys: Iterable[PublicKey]) -> None:
    """Check the ``sig`` of a raw command object against any trusted key.

    Raises:
        SignatureError: no signature, a malformed one, or none of ``keys`` made it.
    """
    sig_text = fields.get("sig")
    if not isinstance(sig_text, str) or not sig_text:
        raise SignatureError("command is not signed")
    try:
        sig = base64.b64decode(sig_text, validate=True)
    except ValueError as exc:
        raise SignatureError("signature is not valid base64") from exc
    try:
        data = _signed_part(fields)
    except (TypeError, ValueError) as exc:
        raise SignatureError(f"command cannot be canonicalised: {exc}") from exc
    if not any(key.verify(sig, data) for key in keys):
        raise SignatureError("signature does not verify against any trusted key")


def generate_keypair(out_dir: Path) -> tuple[Path, Path]:
    """Write ``hub.key`` (PEM, mode 600) and ``hub.pub`` into ``out_dir``.

    Blocking; call through asyncio.to_thread from async code.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    out_dir.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    key_path, pub_path = out_dir / "hub.key", out_dir / "hub.pub"
    # Random no-follow temp names: a link planted beside the key cannot redirect it (issue 16).
    write_atomic(key_path, private, 0o600)
    write_atomic(pub_path, public, 0o644)
    return key_path, pub_path


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Read a PEM Ed25519 private key; ConfigError with the reason otherwise."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"cannot load signing key {path}: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"signing key {path} is not an Ed25519 key")
    return key


def public_key_of(key: Ed25519PrivateKey) -> PublicKey:
    """The verifying half of a signing key, as agents hold it."""
    from cryptography.hazmat.primitives import serialization

    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return PublicKey(raw)


def load_public_keys(path: Path) -> list[PublicKey]:
    """Read every PEM Ed25519 public key in a trust file (one or more blocks)."""
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read trust file {path}: {exc}") from exc
    keys: list[PublicKey] = []
    marker = b"-----END PUBLIC KEY-----"
    for block in text.split(marker):
        if b"-----BEGIN PUBLIC KEY-----" not in block:
            continue
        begin = block.index(b"-----BEGIN PUBLIC KEY-----")
        try:
            keys.append(public_key_from_pem(block[begin:] + marker))
        except ValueError as exc:
            raise ConfigError(f"bad public key in {path}: {exc}") from exc
    if not keys:
        raise ConfigError(f"trust file {path} holds no public key")
    return keys
