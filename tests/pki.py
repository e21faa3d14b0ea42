"""A small PKI for tests, made with ``cryptography``: CAs, end-entity
certificates of every key type we support, and PEM for files."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from common.ike.certs import PrivateKey

#: the tests' wall clock (certificates are valid around it)
NOW = datetime(2026, 12, 1, tzinfo=UTC)
KINDS = ("rsa2048", "p256", "p384", "p521", "ed25519")

_KEYS: dict[str, PrivateKey] = {}


def new_key(kind: str) -> PrivateKey:
    if kind.startswith("rsa"):
        return rsa.generate_private_key(65537, int(kind[3:]))
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    curve = {"p256": ec.SECP256R1(), "p384": ec.SECP384R1(), "p521": ec.SECP521R1()}[kind]
    return ec.generate_private_key(curve)


def cached_key(kind: str, slot: str = "") -> PrivateKey:
    """RSA key generation is slow: reuse keys across tests by (kind, slot)."""
    name = f"{kind}/{slot}"
    if name not in _KEYS:
        _KEYS[name] = new_key(kind)
    return _KEYS[name]


def _hash(key: PrivateKey) -> hashes.HashAlgorithm | None:
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


def dn(text: str) -> x509.Name:
    """"C=CH, O=Example, CN=gw" (DER order) as a Name."""
    oids = {"C": NameOID.COUNTRY_NAME, "O": NameOID.ORGANIZATION_NAME,
            "OU": NameOID.ORGANIZATIONAL_UNIT_NAME, "CN": NameOID.COMMON_NAME}
    return x509.Name([x509.NameAttribute(oids[k.strip()], v.strip())
                      for k, v in (p.split("=", 1) for p in text.split(","))])


@dataclass
class Issued:
    cert: x509.Certificate
    key: PrivateKey

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())

    def write(self, folder: Path, name: str) -> tuple[Path, Path]:
        cert, key = folder / f"{name}.crt", folder / f"{name}.key"
        cert.write_bytes(self.cert_pem)
        key.write_bytes(self.key_pem)
        return cert, key


def make_ca(subject: str = "C=CH, O=Test, CN=Test CA", kind: str = "p256",
            not_before: datetime = NOW - timedelta(days=365),
            not_after: datetime = NOW + timedelta(days=3650),
            issuer: Issued | None = None) -> Issued:
    key = cached_key(kind, "ca:" + subject)
    name = dn(subject)
    b = (x509.CertificateBuilder().subject_name(name)
         .issuer_name(issuer.cert.subject if issuer else name)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(not_before).not_valid_after(not_after)
         .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
         .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                      False), critical=True))
    signer = issuer.key if issuer else key
    return Issued(b.sign(signer, _hash(signer)), key)


def make_cert(ca: Issued, subject: str, kind: str = "p256", *, sans: tuple[str, ...] = (),
              not_before: datetime = NOW - timedelta(days=1),
              not_after: datetime = NOW + timedelta(days=365),
              digital_signature: bool = True, slot: str = "") -> Issued:
    """An end-entity certificate; ``sans``: "@fqdn", "user@host" or an IP."""
    key = cached_key(kind, slot or subject)
    names: list[x509.GeneralName] = []
    for s in sans:
        if s.startswith("@"):
            names.append(x509.DNSName(s[1:]))
        elif "@" in s:
            names.append(x509.RFC822Name(s))
        else:
            names.append(x509.IPAddress(ipaddress.ip_address(s)))
    b = (x509.CertificateBuilder().subject_name(dn(subject)).issuer_name(ca.cert.subject)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(not_before).not_valid_after(not_after)
         .add_extension(x509.KeyUsage(digital_signature, False, not digital_signature, False,
                                      False, False, False, False, False), critical=True))
    if names:
        b = b.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return Issued(b.sign(ca.key, _hash(ca.key)), key)
