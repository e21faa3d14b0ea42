"""IKEv2 key derivation and authentication octets (RFC 7296 §2.13-§2.18, §2.15, §2.23).

Rules of this file:
- Pure functions over bytes: no I/O, no clock, no randomness.
- Key material never appears in a repr or a log line (``field(repr=False)``).
- Only HMAC PRFs are supported. RFC 7296 §2.14 truncates Ni and Nr for PRFs
  with a fixed key size (AES-XCBC, AES-CMAC); HMAC takes ``Ni | Nr`` as the key
  as it is, so there is no such special case here.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass, field

from common.errors import LocalProtocolError
from common.ike.constants import PrfId
from common.ike.proposals import EspSuite, IkeSuite, prf_digest

#: RFC 7296 §2.13: prf+ stops after T255 (the counter is one octet).
PRF_PLUS_MAX_ITERATIONS = 255

#: RFC 7296 §2.15: the pad mixed into a shared secret before it signs.
KEY_PAD = b"Key Pad for IKEv2"

_PORT = struct.Struct("!H")


def prf(prf_id: PrfId, key: bytes, data: bytes) -> bytes:
    """prf(K, S) of RFC 7296 §2.13: HMAC with the PRF's hash (RFC 2104, RFC 4868)."""
    return hmac.digest(key, data, prf_digest(prf_id))


def prf_plus(prf_id: PrfId, key: bytes, seed: bytes, length: int) -> bytes:
    """prf+(K, S) of RFC 7296 §2.13, truncated to ``length`` octets.

    T1 = prf(K, S | 0x01), Tn = prf(K, Tn-1 | S | n); the output is T1 | T2 | ...
    """
    digest = prf_digest(prf_id)
    size = hashlib.new(digest).digest_size
    iterations = -(-length // size)
    if length < 0 or iterations > PRF_PLUS_MAX_ITERATIONS:
        raise LocalProtocolError(
            f"prf+ cannot produce {length} octets with {prf_id!r} "
            f"(at most {PRF_PLUS_MAX_ITERATIONS} blocks of {size})"
        )
    out = bytearray()
    block = b""
    for counter in range(1, iterations + 1):
        block = hmac.digest(key, block + seed + bytes((counter,)), digest)
        out += block
    return bytes(out[:length])


@dataclass(slots=True, frozen=True)
class IkeKeys:
    """The seven keys of an IKE SA (RFC 7296 §2.14), never shown in a repr.

    ``sk_ei``/``sk_er`` include the 4-octet salt for AES-GCM (RFC 5282 §7.1);
    ``sk_ai``/``sk_ar`` are empty for AEAD suites.
    """

    sk_d: bytes = field(repr=False)
    sk_ai: bytes = field(repr=False)
    sk_ar: bytes = field(repr=False)
    sk_ei: bytes = field(repr=False)
    sk_er: bytes = field(repr=False)
    sk_pi: bytes = field(repr=False)
    sk_pr: bytes = field(repr=False)


def _split_ike_keys(suite: IkeSuite, skeyseed: bytes, seed: bytes) -> IkeKeys:
    prf_len, a_len, e_len = suite.prf_len, suite.sk_a_len, suite.sk_e_len
    lengths = (prf_len, a_len, a_len, e_len, e_len, prf_len, prf_len)
    material = prf_plus(suite.prf, skeyseed, seed, sum(lengths))
    parts: list[bytes] = []
    offset = 0
    for n in lengths:
        parts.append(material[offset : offset + n])
        offset += n
    return IkeKeys(*parts)


def derive_ike_keys(
    suite: IkeSuite, ni: bytes, nr: bytes, shared_secret: bytes, spi_i: bytes, spi_r: bytes
) -> IkeKeys:
    """Keys of a new IKE SA from IKE_SA_INIT (RFC 7296 §2.14).

    SKEYSEED = prf(Ni | Nr, g^ir);
    {SK_d | SK_ai | SK_ar | SK_ei | SK_er | SK_pi | SK_pr} = prf+(SKEYSEED, Ni | Nr | SPIi | SPIr)
    """
    skeyseed = prf(suite.prf, ni + nr, shared_secret)
    return _split_ike_keys(suite, skeyseed, ni + nr + spi_i + spi_r)


def derive_rekeyed_ike_keys(
    old_prf: PrfId,
    old_sk_d: bytes,
    suite: IkeSuite,
    ni: bytes,
    nr: bytes,
    shared_secret: bytes,
    spi_i: bytes,
    spi_r: bytes,
) -> IkeKeys:
    """Keys of the IKE SA that replaces an old one (RFC 7296 §2.18).

    SKEYSEED = prf(SK_d (old), g^ir (new) | Ni | Nr) with the OLD SA's PRF,
    because the rekeying exchange belongs to the old SA; the seven keys then come
    from prf+ with the NEW suite's PRF, the new nonces and the new SPIs.
    """
    skeyseed = prf(old_prf, old_sk_d, shared_secret + ni + nr)
    return _split_ike_keys(suite, skeyseed, ni + nr + spi_i + spi_r)


def derive_child_keymat(
    prf_id: PrfId,
    sk_d: bytes,
    ni: bytes,
    nr: bytes,
    esp: EspSuite,
    shared_secret: bytes | None,
) -> tuple[bytes, bytes]:
    """KEYMAT of a Child SA pair (RFC 7296 §2.17), as (initiator->responder,
    responder->initiator).

    KEYMAT = prf+(SK_d, [g^ir (new) |] Ni | Nr). The SA carrying data from the
    initiator to the responder takes its keys first, and within one SA the
    encryption key (with its 4-octet salt or nonce, RFC 4106 §8.1, RFC 3686 §5.1)
    comes before the integrity key; so each half is already laid out as
    common.esp.transforms wants it: encr key | salt | [integ key].
    """
    seed = ni + nr if shared_secret is None else shared_secret + ni + nr
    n = esp.keymat_len
    keymat = prf_plus(prf_id, sk_d, seed, 2 * n)
    return keymat[:n], keymat[n:]


def auth_octets(
    prf_id: PrfId, signed_message: bytes, peer_nonce: bytes, sk_p: bytes, id_body: bytes
) -> bytes:
    """The octets an AUTH payload signs or MACs (RFC 7296 §2.15):
    RealMessage | NonceData | prf(SK_p, RestOfIDPayload).

    ``signed_message`` is the sender's own first message (IKE_SA_INIT request for
    the initiator, response for the responder); ``peer_nonce`` the OTHER side's
    nonce data; ``sk_p`` the sender's own SK_pi/SK_pr; ``id_body`` the sender's
    ID payload after the generic header: ID type, 3 reserved octets, data.
    """
    return signed_message + peer_nonce + prf(prf_id, sk_p, id_body)


def psk_auth(
    prf_id: PrfId,
    psk: bytes,
    signed_message: bytes,
    peer_nonce: bytes,
    sk_p: bytes,
    id_body: bytes,
) -> bytes:
    """AUTH data for SHARED_KEY_MIC (RFC 7296 §2.15):
    prf(prf(Shared Secret, "Key Pad for IKEv2"), <auth_octets>).

    The verifier recomputes it with the peer's values and compares with
    ``hmac.compare_digest``.
    """
    octets = auth_octets(prf_id, signed_message, peer_nonce, sk_p, id_body)
    return prf(prf_id, prf(prf_id, psk, KEY_PAD), octets)


def nat_detection_hash(spi_i: bytes, spi_r: bytes, ip: bytes, port: int) -> bytes:
    """NAT_DETECTION_*_IP notification data (RFC 7296 §2.23):
    SHA-1(SPIi | SPIr | IP | Port), with SPIr all zeros in the IKE_SA_INIT request."""
    return hashlib.sha1(spi_i + spi_r + ip + _PORT.pack(port), usedforsecurity=False).digest()
