"""Ed25519 signature verification for agents, without loading ``cryptography``.

An agent only ever *verifies* (the hub signs). ``cryptography`` carries its
own statically linked OpenSSL and costs an agent about 6 MiB of RSS, while
the process has the system's ``libcrypto`` mapped already (through ``ssl``,
which paho imports). So :class:`PublicKey` verifies through that library's
EVP interface with ``ctypes`` when it is there and passes the RFC 8032
known-answer test; otherwise it falls back to ``cryptography``. Both give the
same answers; ``tests/unit/test_ed25519.py`` checks them against each other.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
from collections.abc import Callable
from typing import Protocol, cast

__all__ = ["PublicKey", "backend_name", "public_key_from_pem"]

#: DER prefix of an Ed25519 SubjectPublicKeyInfo; the raw 32-byte key follows.
_SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")
_NID_ED25519 = 1087
_LIBRARIES = ("libcrypto.so.3", "libcrypto.so.1.1", "libcrypto.so")

# RFC 8032 section 7.1, TEST 2 (a one-byte message).
_KAT_KEY = bytes.fromhex("3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c")
_KAT_MESSAGE = bytes.fromhex("72")
_KAT_SIGNATURE = bytes.fromhex(
    "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da"
    "085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00"
)


class _Backend(Protocol):
    name: str

    def load(self, raw: bytes) -> object: ...

    def verify(self, handle: object, signature: bytes, data: bytes) -> bool: ...

    def free(self, handle: object) -> None: ...


class _LibCrypto:
    """The system OpenSSL (1.1.1 or 3.x) through its EVP one-shot verify."""

    name = "libcrypto"

    def __init__(self, lib: ctypes.CDLL) -> None:
        vp, sz, cp = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p
        self._new_key = _function(lib, "EVP_PKEY_new_raw_public_key", vp, [ctypes.c_int, vp, cp, sz])
        self._free_key = _function(lib, "EVP_PKEY_free", None, [vp])
        self._new_ctx = _function(lib, "EVP_MD_CTX_new", vp, [])
        self._free_ctx = _function(lib, "EVP_MD_CTX_free", None, [vp])
        self._init = _function(lib, "EVP_DigestVerifyInit", ctypes.c_int, [vp, vp, vp, vp, vp])
        self._verify = _function(lib, "EVP_DigestVerify", ctypes.c_int, [vp, cp, sz, cp, sz])
        self._clear_errors = _function(lib, "ERR_clear_error", None, [])

    def load(self, raw: bytes) -> object:
        handle = self._new_key(_NID_ED25519, None, raw, len(raw))
        if not handle:
            self._clear_errors()
            raise ValueError("libcrypto refused the Ed25519 public key")
        return handle

    def verify(self, handle: object, signature: bytes, data: bytes) -> bool:
        ctx = self._new_ctx()
        if not ctx:
            raise MemoryError("EVP_MD_CTX_new failed")
        try:
            ok = self._init(ctx, None, None, None, handle) == 1
            ok = ok and self._verify(ctx, signature, len(signature), data, len(data)) == 1
        finally:
            self._free_ctx(ctx)
        if not ok:
            self._clear_errors()  # a failed verify leaves entries on the thread's error queue
        return ok

    def free(self, handle: object) -> None:
        self._free_key(handle)


class _Cryptography:
    """The ``cryptography`` package: always correct, heavier to load."""

    name = "cryptography"

    def load(self, raw: bytes) -> object:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        return Ed25519PublicKey.from_public_bytes(raw)

    def verify(self, handle: object, signature: bytes, data: bytes) -> bool:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        key = cast(Ed25519PublicKey, handle)
        try:
            key.verify(signature, data)
        except InvalidSignature:
            return False
        return True

    def free(self, handle: object) -> None:
        del handle


def _function(lib: ctypes.CDLL, name: str, restype: type | None, argtypes: list[type]) -> Callable[..., int]:
    function = getattr(lib, name)
    function.restype = restype
    function.argtypes = argtypes
    return function  # type: ignore[no-any-return]


def _passes_known_answer(backend: _Backend) -> bool:
    handle = backend.load(_KAT_KEY)
    try:
        good = backend.verify(handle, _KAT_SIGNATURE, _KAT_MESSAGE)
        forged = backend.verify(handle, _KAT_SIGNATURE, b"\x73")
        return good and not forged
    finally:
        backend.free(handle)


def _libcrypto() -> _Backend | None:
    for name in _LIBRARIES:
        try:
            backend = _LibCrypto(ctypes.CDLL(name))
            if _passes_known_answer(backend):
                return backend
        except (OSError, AttributeError, ValueError):
            continue  # not there, too old (no raw keys before 1.1.1), or wrong answers
    return None


_chosen: _Backend | None = None


def _backend() -> _Backend:
    global _chosen
    if _chosen is None:
        _chosen = _libcrypto() or _Cryptography()
    return _chosen


def backend_name() -> str:
    """``libcrypto`` or ``cryptography``: what verifies signatures in this process."""
    return _backend().name


class PublicKey:
    """A trusted Ed25519 public key (the raw 32 bytes) that verifies signatures."""

    __slots__ = ("_backend", "_handle", "raw")

    def __init__(self, raw: bytes, *, backend: _Backend | None = None) -> None:
        if len(raw) != 32:
            raise ValueError(f"an Ed25519 public key is 32 bytes, not {len(raw)}")
        self.raw = bytes(raw)
        self._backend = backend or _backend()
        self._handle: object = self._backend.load(self.raw)

    def verify(self, signature: bytes, data: bytes) -> bool:
        """True when ``signature`` is this key's Ed25519 signature of ``data``."""
        if len(signature) != 64:
            return False
        return self._backend.verify(self._handle, signature, data)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PublicKey) and other.raw == self.raw

    def __hash__(self) -> int:
        return hash(self.raw)

    def __repr__(self) -> str:
        return f"PublicKey({base64.b64encode(self.raw).decode('ascii')})"

    def __del__(self) -> None:
        handle = getattr(self, "_handle", None)
        if handle is not None:
            with contextlib.suppress(Exception):  # at interpreter exit the library may be gone
                self._backend.free(handle)


def public_key_from_pem(block: bytes) -> PublicKey:
    """One ``-----BEGIN PUBLIC KEY-----`` block (SubjectPublicKeyInfo) holding an Ed25519 key.

    Raises:
        ValueError: not PEM, not base64, or not an Ed25519 key.
    """
    lines = block.strip().splitlines()
    if len(lines) < 3 or lines[0].strip() != b"-----BEGIN PUBLIC KEY-----":
        raise ValueError("not a PEM public key block")
    if lines[-1].strip() != b"-----END PUBLIC KEY-----":
        raise ValueError("PEM block has no END line")
    try:
        der = base64.b64decode(b"".join(line.strip() for line in lines[1:-1]), validate=True)
    except ValueError as exc:
        raise ValueError("PEM body is not base64") from exc
    if len(der) != len(_SPKI_PREFIX) + 32 or not der.startswith(_SPKI_PREFIX):
        raise ValueError("not an Ed25519 public key")
    return PublicKey(der[len(_SPKI_PREFIX) :])
