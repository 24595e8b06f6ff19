"""A private CA and the broker's server certificate, made with ``cryptography``.

``fleet broker-config --tls`` writes them under ``DIR/tls/``: ``ca.pem`` (give it
to every client: ``mqtts://...?ca=PATH``), ``ca.key`` (keep it offline once the
fleet is set up), ``server.pem`` and ``server.key`` (the broker's). Keys are
ECDSA P-256, PKCS#8 PEM without a passphrase (brokers start unattended), mode 600.
The server certificate names the broker's host, ``127.0.0.1`` and ``localhost``.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["CA_DAYS", "SERVER_DAYS", "KeyPair", "ensure_tls", "make_ca", "make_server_cert", "server_names"]

#: Validity of the CA (it only signs the broker's certificate).
CA_DAYS = 3650
#: Validity of the broker's certificate; ``--add`` reissues it when the host changes.
SERVER_DAYS = 825

_FILES = ("ca.pem", "ca.key", "server.pem", "server.key")


@dataclass(frozen=True)
class KeyPair:
    """A certificate and its private key, both PEM."""

    cert_pem: bytes
    key_pem: bytes


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_ca(common_name: str = "fleetbus broker CA", now: datetime.datetime | None = None) -> KeyPair:
    """A self-signed CA that may sign server certificates only (path length 0)."""
    now = now or _now()
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return KeyPair(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def _general_name(value: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(value))
    except ValueError:
        return x509.DNSName(value)


def make_server_cert(ca: KeyPair, host: str, now: datetime.datetime | None = None) -> KeyPair:
    """The broker's certificate, signed by ``ca``; SAN: ``host``, 127.0.0.1, localhost."""
    now = now or _now()
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise TypeError("the CA key is not an EC key")
    key = ec.generate_private_key(ec.SECP256R1())
    names = list(dict.fromkeys([host, "127.0.0.1", "localhost"]))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=SERVER_DAYS))
        .add_extension(x509.SubjectAlternativeName([_general_name(n) for n in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return KeyPair(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def server_names(cert_pem: bytes) -> set[str]:
    """The DNS names and IP addresses a certificate's SAN lists."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    addresses = (str(ip) for ip in san.get_values_for_type(x509.IPAddress))
    return {*san.get_values_for_type(x509.DNSName), *addresses}


def _normal(host: str) -> str:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host


def ensure_tls(tls_dir: Path, host: str, *, reuse: bool, write: Callable[[Path, bytes, int], None]) -> None:
    """Create the CA and server certificate in ``tls_dir``, or keep the existing ones.

    With ``reuse`` an existing CA is kept, and so is the server certificate
    unless it does not name ``host`` (then a new one is signed by the same CA, so
    clients keep trusting it). ``write(path, data, mode)`` writes one file atomically.

    Blocking (files); call through asyncio.to_thread from async code.
    """
    paths = {name: tls_dir / name for name in _FILES}
    if reuse and paths["ca.pem"].exists() and paths["ca.key"].exists():
        ca = KeyPair(paths["ca.pem"].read_bytes(), paths["ca.key"].read_bytes())
        if paths["server.pem"].exists() and paths["server.key"].exists():
            names = server_names(paths["server.pem"].read_bytes())
            if _normal(host) in names:
                return
    else:
        ca = make_ca()
        write(paths["ca.key"], ca.key_pem, 0o600)
        write(paths["ca.pem"], ca.cert_pem, 0o644)
    server = make_server_cert(ca, host)
    write(paths["server.key"], server.key_pem, 0o600)
    write(paths["server.pem"], server.cert_pem, 0o644)
