"""Certificate authentication for IKE_AUTH (RFC 7296 §2.15, §3.6-§3.8; RFC 7427
digital signatures; RFC 4754 ECDSA; RFC 8420 Ed25519).

Pure: the wall-clock time for validity checks is passed in (``now``), keys and
certificates come as PEM/DER bytes the shell read. Chain checks are explicit
(issuer name + signature up to a configured trust anchor, validity of every
certificate, CA basic constraints, key usage), because the WebPKI profile of
``cryptography.x509.verification`` wants server/client EKUs and SANs that IPsec
certificates often lack. Every refusal is a ``CertificateRefused`` whose text
names the check that failed, for the one log line of AUTHENTICATION_FAILED.
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.x509.oid import NameOID

from common.ike.constants import AuthMethod, HashAlgorithm, IdType

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey

#: RFC 7427 §4: what we announce in N(SIGNATURE_HASH_ALGORITHMS); SHA-1 is not
#: offered (it is still verified in the classic RSA method 1 of RFC 7296).
OUR_HASH_ALGORITHMS = (HashAlgorithm.SHA2_256, HashAlgorithm.SHA2_384,
                       HashAlgorithm.SHA2_512, HashAlgorithm.IDENTITY)
MAX_CHAIN_DEPTH = 8

_HASHES: dict[HashAlgorithm, type[hashes.HashAlgorithm]] = {
    HashAlgorithm.SHA2_256: hashes.SHA256, HashAlgorithm.SHA2_384: hashes.SHA384,
    HashAlgorithm.SHA2_512: hashes.SHA512,
}
# RFC 4754 §7 / RFC 7296 §3.8: classic ECDSA methods fix curve and hash.
_CLASSIC_EC: dict[AuthMethod, tuple[str, type[hashes.HashAlgorithm], int]] = {
    AuthMethod.ECDSA_SHA256_P256: ("secp256r1", hashes.SHA256, 32),
    AuthMethod.ECDSA_SHA384_P384: ("secp384r1", hashes.SHA384, 48),
    AuthMethod.ECDSA_SHA512_P521: ("secp521r1", hashes.SHA512, 66),
}
_CURVE_HASH = {"secp256r1": HashAlgorithm.SHA2_256, "secp384r1": HashAlgorithm.SHA2_384,
               "secp521r1": HashAlgorithm.SHA2_512}

# DER object identifiers (contents only) of RFC 7427 Appendix A.
_PKCS1 = bytes.fromhex("2a864886f70d0101")
_OID_RSA = {_PKCS1 + b"\x0b": HashAlgorithm.SHA2_256, _PKCS1 + b"\x0c": HashAlgorithm.SHA2_384,
            _PKCS1 + b"\x0d": HashAlgorithm.SHA2_512}
_OID_PSS = _PKCS1 + b"\x0a"
_OID_MGF1 = _PKCS1 + b"\x08"
_ECDSA = bytes.fromhex("2a8648ce3d0403")
_OID_ECDSA = {_ECDSA + b"\x02": HashAlgorithm.SHA2_256, _ECDSA + b"\x03": HashAlgorithm.SHA2_384,
              _ECDSA + b"\x04": HashAlgorithm.SHA2_512}
_OID_ED25519 = bytes.fromhex("2b6570")
_NIST_HASH = bytes.fromhex("6086480165030402")
_OID_HASH = {_NIST_HASH + b"\x01": HashAlgorithm.SHA2_256,
             _NIST_HASH + b"\x02": HashAlgorithm.SHA2_384,
             _NIST_HASH + b"\x03": HashAlgorithm.SHA2_512}


class CertificateRefused(Exception):
    """A peer's certificate or signature failed a check; ``str()`` says which."""


# -- DER, just enough for AlgorithmIdentifier (RFC 5280 §4.1.1.2) ------------------------


def _tlv(tag: int, body: bytes) -> bytes:
    n = len(body)
    if n < 0x80:
        return bytes([tag, n]) + body
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + body


def _read(data: bytes, pos: int = 0) -> tuple[int, bytes, int]:
    """One TLV at ``pos``: (tag, contents, next position)."""
    if pos + 2 > len(data):
        raise CertificateRefused("truncated AlgorithmIdentifier")
    tag, first = data[pos], data[pos + 1]
    pos += 2
    if first & 0x80:
        k = first & 0x7F
        if not 0 < k <= 2 or pos + k > len(data):
            raise CertificateRefused("bad DER length in AlgorithmIdentifier")
        n, pos = int.from_bytes(data[pos:pos + k], "big"), pos + k
    else:
        n = first
    if pos + n > len(data):
        raise CertificateRefused("truncated AlgorithmIdentifier")
    return tag, data[pos:pos + n], pos + n


def _alg_id(oid: bytes, params: bytes | None = None) -> bytes:
    return _tlv(0x30, _tlv(0x06, oid) + (params if params is not None else b""))


def _hash_alg_id(h: HashAlgorithm) -> bytes:
    oid = next(o for o, v in _OID_HASH.items() if v == h)
    return _alg_id(oid, b"\x05\x00")


def _pss_alg_id(h: HashAlgorithm) -> bytes:
    """RSASSA-PSS with MGF1 of the same hash and a salt as long as the hash
    (RFC 4055 §3.1; what strongSwan sends with rsa/pss)."""
    hid = _hash_alg_id(h)
    salt = _HASHES[h]().digest_size
    params = _tlv(0x30, _tlv(0xA0, hid) + _tlv(0xA1, _alg_id(_OID_MGF1, hid))
                  + _tlv(0xA2, _tlv(0x02, bytes([salt]))))
    return _alg_id(_OID_PSS, params)


def _parse_pss(params: bytes) -> tuple[HashAlgorithm, int]:
    tag, seq, _ = _read(params)
    if tag != 0x30:
        raise CertificateRefused("bad RSASSA-PSS parameters")
    h, salt, pos = HashAlgorithm.SHA1, 20, 0
    while pos < len(seq):
        tag, body, pos = _read(seq, pos)
        if tag == 0xA0:
            _, alg, _ = _read(body)
            _, oid, _ = _read(alg)
            if oid not in _OID_HASH:
                raise CertificateRefused("RSASSA-PSS with an unsupported hash")
            h = _OID_HASH[oid]
        elif tag == 0xA2:
            _, num, _ = _read(body)
            salt = int.from_bytes(num, "big")
    if h not in _HASHES:
        raise CertificateRefused("RSASSA-PSS with SHA-1 is refused")
    return h, salt


# -- credentials ---------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class LocalCredential:
    """Our certificate (then any intermediates, as DER) and its private key."""

    chain: tuple[bytes, ...]
    key: PrivateKey
    cert: x509.Certificate
    #: sign RSA with PSS in RFC 7427 (strongSwan's ``rsa/pss``); else PKCS#1 v1.5
    rsa_pss: bool = False


@dataclass(slots=True, frozen=True)
class TrustAnchors:
    certs: tuple[x509.Certificate, ...]

    def certreq_data(self) -> bytes:
        """CERTREQ body after the encoding octet: SHA-1 of each anchor's
        SubjectPublicKeyInfo (RFC 7296 §3.7)."""
        return b"".join(spki_sha1(c) for c in self.certs)


def spki_sha1(cert: x509.Certificate) -> bytes:
    spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha1(spki, usedforsecurity=False).digest()


def load_certificates(pem: bytes) -> list[x509.Certificate]:
    """Every certificate in PEM (or one DER) bytes; ValueError if none."""
    if b"-----BEGIN" in pem:
        certs = x509.load_pem_x509_certificates(pem)
    else:
        certs = [x509.load_der_x509_certificate(pem)]
    if not certs:
        raise ValueError("no certificate in it")
    return certs


def load_credential(cert_pem: bytes, key_pem: bytes, rsa_pss: bool = False) -> LocalCredential:
    """Our certificate chain and key; ValueError (one line) if the key does not
    load, is of an unsupported type, or does not match the certificate."""
    certs = load_certificates(cert_pem)
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ValueError(f"not an unencrypted PEM private key ({str(exc).splitlines()[0]})"
                         ) from None
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
                      | ed25519.Ed25519PrivateKey):
        raise ValueError(f"unsupported key type {type(key).__name__}")
    if rsa_pss and not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError(f"rsa/pss needs an RSA key, not {type(key).__name__}")
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if key.public_key().public_bytes(*fmt) != certs[0].public_key().public_bytes(*fmt):
        raise ValueError("the key does not match the certificate's public key")
    chain = tuple(c.public_bytes(serialization.Encoding.DER) for c in certs)
    return LocalCredential(chain, key, certs[0], rsa_pss)


# -- signatures ------------------------------------------------------------------------------


def _pick_hash(cred: LocalCredential, peer: frozenset[int]) -> HashAlgorithm:
    key = cred.key
    preferred = [HashAlgorithm.SHA2_256, HashAlgorithm.SHA2_384, HashAlgorithm.SHA2_512]
    if isinstance(key, ec.EllipticCurvePrivateKey):
        first = _CURVE_HASH.get(key.curve.name, HashAlgorithm.SHA2_256)
        preferred.remove(first)
        preferred.insert(0, first)
    return next((h for h in preferred if h in peer), preferred[0])


def sign_auth(cred: LocalCredential, octets: bytes,
              peer_hashes: frozenset[int] | None) -> tuple[AuthMethod, bytes]:
    """AUTH method and data signing ``octets`` (RFC 7296 §2.15). With the
    peer's N(SIGNATURE_HASH_ALGORITHMS): RFC 7427 method 14; without it, the
    classic method of the key type (RSA: 1, ECDSA: 9/10/11); Ed25519 has only 14."""
    key = cred.key
    if isinstance(key, ed25519.Ed25519PrivateKey):
        alg = _alg_id(_OID_ED25519)
        return AuthMethod.DIGITAL_SIGNATURE, bytes([len(alg)]) + alg + key.sign(octets)
    if peer_hashes is None:
        if isinstance(key, rsa.RSAPrivateKey):
            return AuthMethod.RSA_SIG, key.sign(octets, padding.PKCS1v15(), hashes.SHA1())  # noqa: S303 (RFC 7296 §3.8 method 1)
        method = next(m for m, (c, _, _) in _CLASSIC_EC.items() if c == key.curve.name)
        _, hcls, size = _CLASSIC_EC[method]
        r, s = decode_dss_signature(key.sign(octets, ec.ECDSA(hcls())))
        return method, r.to_bytes(size, "big") + s.to_bytes(size, "big")
    h = _pick_hash(cred, peer_hashes)
    hcls = _HASHES[h]
    if isinstance(key, rsa.RSAPrivateKey):
        if cred.rsa_pss:
            alg = _pss_alg_id(h)
            sig = key.sign(octets, padding.PSS(padding.MGF1(hcls()), hcls().digest_size), hcls())
        else:
            alg = _alg_id(next(o for o, v in _OID_RSA.items() if v == h), b"\x05\x00")
            sig = key.sign(octets, padding.PKCS1v15(), hcls())
    else:
        alg = _alg_id(next(o for o, v in _OID_ECDSA.items() if v == h))
        sig = key.sign(octets, ec.ECDSA(hcls()))
    return AuthMethod.DIGITAL_SIGNATURE, bytes([len(alg)]) + alg + sig


def verify_auth(public: PublicKey, method: AuthMethod, data: bytes, octets: bytes) -> None:
    """Check an AUTH payload's signature over ``octets`` with the peer's key;
    raises CertificateRefused naming what is wrong."""
    try:
        _verify(public, method, data, octets)
    except InvalidSignature:
        raise CertificateRefused(f"bad signature ({method.name})") from None


def _verify(public: PublicKey, method: AuthMethod, data: bytes, octets: bytes) -> None:
    if method == AuthMethod.RSA_SIG:
        if not isinstance(public, rsa.RSAPublicKey):
            raise CertificateRefused("RSA signature method with a non-RSA certificate")
        public.verify(data, octets, padding.PKCS1v15(), hashes.SHA1())  # noqa: S303 (RFC 7296 §3.8 method 1)
        return
    if method in _CLASSIC_EC:
        curve, hcls, size = _CLASSIC_EC[method]
        if not isinstance(public, ec.EllipticCurvePublicKey) or public.curve.name != curve:
            raise CertificateRefused(f"{method.name} needs a {curve} certificate")
        if len(data) != 2 * size:
            raise CertificateRefused(f"{method.name} signature of {len(data)} bytes")
        sig = encode_dss_signature(int.from_bytes(data[:size], "big"),
                                   int.from_bytes(data[size:], "big"))
        public.verify(sig, octets, ec.ECDSA(hcls()))
        return
    if method != AuthMethod.DIGITAL_SIGNATURE:
        raise CertificateRefused(f"auth method {method.name} is not supported")
    if not data or len(data) < 1 + data[0]:
        raise CertificateRefused("RFC 7427 AUTH data shorter than its AlgorithmIdentifier")
    alg, sig = data[1:1 + data[0]], data[1 + data[0]:]
    tag, body, end = _read(alg)
    if tag != 0x30 or end != len(alg):
        raise CertificateRefused("bad AlgorithmIdentifier")
    tag, oid, pos = _read(body)
    params = body[pos:]
    if oid == _OID_ED25519 and isinstance(public, ed25519.Ed25519PublicKey):
        public.verify(sig, octets)
    elif oid in _OID_ECDSA and isinstance(public, ec.EllipticCurvePublicKey):
        public.verify(sig, octets, ec.ECDSA(_HASHES[_OID_ECDSA[oid]]()))
    elif oid in _OID_RSA and isinstance(public, rsa.RSAPublicKey):
        public.verify(sig, octets, padding.PKCS1v15(), _HASHES[_OID_RSA[oid]]())
    elif oid == _OID_PSS and isinstance(public, rsa.RSAPublicKey):
        h, salt = _parse_pss(params)
        hcls = _HASHES[h]
        public.verify(sig, octets, padding.PSS(padding.MGF1(hcls()), salt), hcls())
    else:
        raise CertificateRefused(f"signature algorithm {oid.hex()} does not fit the "
                                 f"certificate's {type(public).__name__.removesuffix('PublicKey')}"
                                 " key or is not supported")


# -- chains and identities -----------------------------------------------------------------


def describe(cert: x509.Certificate) -> str:
    """The subject as strongSwan prints it ("C=CH, O=Example, CN=gw")."""
    return format_dn(cert.subject.public_bytes()) or "(empty subject)"


def _check_validity(cert: x509.Certificate, now: datetime) -> None:
    if now < cert.not_valid_before_utc:
        raise CertificateRefused(f"certificate '{describe(cert)}' is not valid before "
                                 f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M:%S}Z")
    if now > cert.not_valid_after_utc:
        raise CertificateRefused(f"certificate '{describe(cert)}' expired on "
                                 f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S}Z")


def _key_usage(cert: x509.Certificate) -> x509.KeyUsage | None:
    try:
        return cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return None


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    if cert.issuer != issuer.subject:
        return False
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def verify_chain(certs_der: list[bytes], anchors: TrustAnchors,
                 now: datetime) -> x509.Certificate:
    """The end-entity certificate (first of ``certs_der``) if it chains, through
    the others, to a trust anchor, every certificate is valid at ``now``, CAs
    are CAs allowed to sign certificates and the end entity may sign (key
    usage digitalSignature, RFC 5280 §4.2.1.3). Raises CertificateRefused."""
    if not certs_der:
        raise CertificateRefused("no certificate received (CERT payload)")
    if len(certs_der) > MAX_CHAIN_DEPTH:
        # each candidate costs signature checks: bound the work a peer can ask for
        raise CertificateRefused(f"{len(certs_der)} CERT payloads (at most {MAX_CHAIN_DEPTH})")
    try:
        certs = [x509.load_der_x509_certificate(d) for d in certs_der]
    except (ValueError, x509.InvalidVersion):
        raise CertificateRefused("a CERT payload holds no parsable X.509 certificate") from None
    end = certs[0]
    usage = _key_usage(end)
    if usage is not None and not usage.digital_signature:
        raise CertificateRefused(f"certificate '{describe(end)}' key usage lacks "
                                 "digitalSignature")
    current, pool = end, certs[1:]
    for _ in range(MAX_CHAIN_DEPTH):
        _check_validity(current, now)
        anchor = next((a for a in anchors.certs if _issued_by(current, a)), None)
        if anchor is not None:
            _check_validity(anchor, now)
            return end
        parent = next((c for c in pool if _issued_by(current, c)), None)
        if parent is None:
            issuer = format_dn(current.issuer.public_bytes())
            raise CertificateRefused(f"certificate '{describe(current)}' is not issued by a "
                                     f"trusted CA (issuer '{issuer}')")
        parent_usage = _key_usage(parent)
        if not _is_ca(parent) or (parent_usage is not None and not parent_usage.key_cert_sign):
            raise CertificateRefused(f"intermediate '{describe(parent)}' is not a CA")
        pool.remove(parent)
        current = parent
    raise CertificateRefused(f"certificate chain longer than {MAX_CHAIN_DEPTH}")


PUBLIC_KEY_TYPES = (rsa.RSAPublicKey, ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey)


def check_peer(certs_der: list[bytes], anchors: TrustAnchors, now: datetime,
               ident: tuple[IdType, bytes], who: str, method: AuthMethod, data: bytes,
               octets: bytes) -> str:
    """Why a peer's certificate proof fails (one phrase for the log line of
    AUTHENTICATION_FAILED), "" when it holds: chain, validity and key usage
    (``verify_chain``), the identity ``who`` in the certificate, and the AUTH
    signature over ``octets``. Peer bytes make this return, never raise."""
    try:
        cert = verify_chain(certs_der, anchors, now)
        if not identity_in_certificate(cert, *ident):
            return (f"identity {who} is not in its certificate '{describe(cert)}' "
                    "(subject or subjectAltName)")
        public = cert.public_key()
        if not isinstance(public, PUBLIC_KEY_TYPES):
            return f"certificate key type {type(public).__name__} is not supported"
        verify_auth(public, method, data, octets)
    except CertificateRefused as exc:
        return str(exc)
    except (ValueError, TypeError, KeyError, UnsupportedAlgorithm, x509.InvalidVersion) as exc:
        # cryptography parses names, extensions and keys lazily: a malformed
        # one surfaces here, from the peer's bytes (an unknown string tag in
        # a Name is a KeyError in cryptography 48; a bad version field is
        # x509.InvalidVersion, which is none of the others)
        return f"certificate cannot be used ({str(exc).splitlines()[0] if str(exc) else exc!r})"
    return ""


def identity_in_certificate(cert: x509.Certificate, id_type: IdType, data: bytes) -> bool:
    """RFC 4945 §3.1: the IKE identity is the subject DN or one of the
    subjectAltNames (dNSName, rfc822Name, iPAddress)."""
    if id_type == IdType.ID_DER_ASN1_DN:
        return dn_equal(data, cert.subject.public_bytes())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    if id_type == IdType.ID_FQDN:
        name = data.decode("utf-8", "replace").lower()
        return any(n.lower() == name for n in san.get_values_for_type(x509.DNSName))
    if id_type == IdType.ID_RFC822_ADDR:
        mail = data.decode("utf-8", "replace").lower()
        return any(n.lower() == mail for n in san.get_values_for_type(x509.RFC822Name))
    if id_type in (IdType.ID_IPV4_ADDR, IdType.ID_IPV6_ADDR) and len(data) in (4, 16):
        addr = ipaddress.ip_address(data)
        return any(a == addr for a in san.get_values_for_type(x509.IPAddress))
    return False


# -- distinguished names ------------------------------------------------------------------

_DN_ATTRS = {"C": NameOID.COUNTRY_NAME, "ST": NameOID.STATE_OR_PROVINCE_NAME,
             "L": NameOID.LOCALITY_NAME, "O": NameOID.ORGANIZATION_NAME,
             "OU": NameOID.ORGANIZATIONAL_UNIT_NAME, "CN": NameOID.COMMON_NAME,
             "E": NameOID.EMAIL_ADDRESS, "EMAILADDRESS": NameOID.EMAIL_ADDRESS,
             "SN": NameOID.SURNAME, "SERIALNUMBER": NameOID.SERIAL_NUMBER,
             "DC": NameOID.DOMAIN_COMPONENT, "UID": NameOID.USER_ID,
             "GN": NameOID.GIVEN_NAME, "T": NameOID.TITLE}


def parse_dn(text: str) -> bytes:
    """strongSwan's DN text ("C=CH, O=Example, CN=gw.example", RDNs in DER
    order) as DER; ValueError for an unknown attribute or a part without '='.
    Commas inside a value are escaped with a backslash (RFC 4514 §2.4)."""
    parts, cur, escaped = [], "", False
    for ch in text:
        if escaped:
            cur, escaped = cur + ch, False
        elif ch == "\\":
            escaped = True
        elif ch in ",/" and cur:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    attrs = []
    for part in parts:
        key, eq, value = part.partition("=")
        key, value = key.strip().upper(), value.strip()
        if not eq or not value or key not in _DN_ATTRS:
            raise ValueError(f"{part.strip()!r} is not an attribute like CN=name "
                             f"({', '.join(sorted(_DN_ATTRS))})")
        attrs.append(x509.RelativeDistinguishedName([x509.NameAttribute(_DN_ATTRS[key], value)]))
    return x509.Name(attrs).public_bytes()


def _dn_attrs(der: bytes) -> list[tuple[str, str]]:
    """The (OID, value) pairs of a DER Name in order, read by a minimal walk
    (cryptography parses Names only inside certificates); ValueError if bad."""
    try:
        tag, seq, end = _read(der)
        if tag != 0x30 or end != len(der):
            raise ValueError("not a DER Name")
        out, pos = [], 0
        while pos < len(seq):
            tag, rdn, pos = _read(seq, pos)
            rpos = 0
            while rpos < len(rdn):
                _, atv, rpos = _read(rdn, rpos)
                otag, oid, vpos = _read(atv)
                vtag, value, _ = _read(atv, vpos)
                if tag != 0x31 or otag != 0x06:
                    raise ValueError("bad RDN")
                text = value.decode("utf-16-be" if vtag == 0x1E else "utf-8", "replace")
                out.append((_oid_text(oid), text))
    except CertificateRefused as exc:
        raise ValueError(str(exc)) from None
    return out


def _dn_key(der: bytes) -> list[tuple[str, str]] | None:
    try:
        return [(oid, " ".join(value.split()).lower()) for oid, value in _dn_attrs(der)]
    except ValueError:
        return None


def _oid_text(oid: bytes) -> str:
    if not oid:
        raise ValueError("empty OID")
    parts = [oid[0] // 40, oid[0] % 40] if oid[0] < 80 else [2, oid[0] - 80]
    n = 0
    for b in oid[1:]:
        n = (n << 7) | (b & 0x7F)
        if not b & 0x80:
            parts.append(n)
            n = 0
    return ".".join(map(str, parts))


def dn_equal(a: bytes, b: bytes) -> bool:
    """DNs compare attribute by attribute, case- and spacing-insensitive, in
    DER order or reversed (RFC 4514 text lists RDNs the other way round)."""
    if a == b:
        return True
    ka, kb = _dn_key(a), _dn_key(b)
    return ka is not None and kb is not None and (ka == kb or ka == kb[::-1])


def format_dn(der: bytes) -> str:
    """strongSwan-style text ("C=CH, O=Example, CN=gw") of a DER DN."""
    try:
        attrs = _dn_attrs(der)
    except ValueError:
        return f"ID_DER_ASN1_DN:{der.hex()}"
    short = {v.dotted_string: k for k, v in reversed(list(_DN_ATTRS.items()))}
    return ", ".join(f"{short.get(oid, oid)}={value}" for oid, value in attrs)


# -- N(SIGNATURE_HASH_ALGORITHMS) (RFC 7427 §4) ------------------------------------------


def hash_algorithms_data() -> bytes:
    """Notify data: our hash algorithms, two octets each."""
    return b"".join(int(h).to_bytes(2, "big") for h in OUR_HASH_ALGORITHMS)


def parse_hash_algorithms(data: bytes) -> frozenset[int]:
    """The peer's list; an odd trailing octet is ignored (nothing to name)."""
    return frozenset(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data) - 1, 2))
