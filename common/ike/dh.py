"""Diffie-Hellman key exchange for the KE payload (RFC 7296 §1.2, §3.4).

Rules of this file:
- Key generation is deterministic given the injected ``RandomBytes``: the same
  bytes in give the same key pair out (tests, simulations, replayable runs).
- Public values are in their KE-payload form: ECP x | y fixed-width (RFC 5903
  §7), curve25519 32 octets (RFC 8031 §2), MODP big-endian padded to the prime
  length (RFC 7296 §3.4). Shared secrets likewise: ECP x only (RFC 5903 §9),
  curve25519 32 octets, MODP padded to the prime length.
- A bad peer value raises ``InvalidKeyExchange`` (INVALID_SYNTAX), nothing else.
- The private key never shows in a repr.
"""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric import dh, ec, x25519

from common.errors import RemoteProtocolError
from common.ike.constants import DhId, NotifyType
from common.rand import RandomBytes


class InvalidKeyExchange(RemoteProtocolError):
    """The peer's KE data is not a valid public value for its group (wrong
    length, point not on the curve, MODP value 0, 1 or p-1, all-zero X25519
    result). RFC 7296 §3.4 leaves the notify to us: INVALID_SYNTAX."""

    notify_type = int(NotifyType.INVALID_SYNTAX)
    drop_reason = "bad_ke"


# RFC 3526 §3 (group 14), §4 (group 15) and §5 (group 16); generator 2. The test recomputes them
# from the RFC's formula 2^n - 2^(n-64) - 1 + 2^64 * (floor(2^(n-130) pi) + c).
_MODP_2048_P = int(
    "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74"
    "020BBEA63B139B22514A08798E3404DDEF9519B3CD3A431B302B0A6DF25F1437"
    "4FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B0BFF5CB6F406B7ED"
    "EE386BFB5A899FA5AE9F24117C4B1FE649286651ECE45B3DC2007CB8A163BF05"
    "98DA48361C55D39A69163FA8FD24CF5F83655D23DCA3AD961C62F356208552BB"
    "9ED529077096966D670C354E4ABC9804F1746C08CA18217C32905E462E36CE3B"
    "E39E772C180E86039B2783A2EC07A28FB5C55DF06F4C52C9DE2BCBF695581718"
    "3995497CEA956AE515D2261898FA051015728E5A8AACAA68FFFFFFFFFFFFFFFF",
    16,
)
_MODP_3072_P = int(
    "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74"
    "020BBEA63B139B22514A08798E3404DDEF9519B3CD3A431B302B0A6DF25F1437"
    "4FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B0BFF5CB6F406B7ED"
    "EE386BFB5A899FA5AE9F24117C4B1FE649286651ECE45B3DC2007CB8A163BF05"
    "98DA48361C55D39A69163FA8FD24CF5F83655D23DCA3AD961C62F356208552BB"
    "9ED529077096966D670C354E4ABC9804F1746C08CA18217C32905E462E36CE3B"
    "E39E772C180E86039B2783A2EC07A28FB5C55DF06F4C52C9DE2BCBF695581718"
    "3995497CEA956AE515D2261898FA051015728E5A8AAAC42DAD33170D04507A33"
    "A85521ABDF1CBA64ECFB850458DBEF0A8AEA71575D060C7DB3970F85A6E1E4C7"
    "ABF5AE8CDB0933D71E8C94E04A25619DCEE3D2261AD2EE6BF12FFA06D98A0864"
    "D87602733EC86A64521F2B18177B200CBBE117577A615D6C770988C0BAD946E2"
    "08E24FA074E5AB3143DB5BFCE0FD108E4B82D120A93AD2CAFFFFFFFFFFFFFFFF",
    16,
)
_MODP_4096_P = int(
    "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74"
    "020BBEA63B139B22514A08798E3404DDEF9519B3CD3A431B302B0A6DF25F1437"
    "4FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B0BFF5CB6F406B7ED"
    "EE386BFB5A899FA5AE9F24117C4B1FE649286651ECE45B3DC2007CB8A163BF05"
    "98DA48361C55D39A69163FA8FD24CF5F83655D23DCA3AD961C62F356208552BB"
    "9ED529077096966D670C354E4ABC9804F1746C08CA18217C32905E462E36CE3B"
    "E39E772C180E86039B2783A2EC07A28FB5C55DF06F4C52C9DE2BCBF695581718"
    "3995497CEA956AE515D2261898FA051015728E5A8AAAC42DAD33170D04507A33"
    "A85521ABDF1CBA64ECFB850458DBEF0A8AEA71575D060C7DB3970F85A6E1E4C7"
    "ABF5AE8CDB0933D71E8C94E04A25619DCEE3D2261AD2EE6BF12FFA06D98A0864"
    "D87602733EC86A64521F2B18177B200CBBE117577A615D6C770988C0BAD946E2"
    "08E24FA074E5AB3143DB5BFCE0FD108E4B82D120A92108011A723C12A787E6D7"
    "88719A10BDBA5B2699C327186AF4E23C1A946834B6150BDA2583E9CA2AD44CE8"
    "DBBBC2DB04DE8EF92E8EFC141FBECAA6287C59474E6BC05D99B2964FA090C3A2"
    "233BA186515BE7ED1F612970CEE2D7AFB81BDD762170481CD0069127D5B05AA9"
    "93B4EA988D8FDDC186FFB7DC90A6C08F4DF435C934063199FFFFFFFFFFFFFFFF",
    16,
)
MODP_GENERATOR = 2

#: group -> (prime, private exponent bits). RFC 3526 §8 asks for an exponent of
#: at least twice the group's strength: group 14 ~110-160 bits, group 15 ~130-210,
#: group 16 ~150-240.
_MODP: dict[DhId, tuple[int, int]] = {
    DhId.MODP_2048: (_MODP_2048_P, 320),
    DhId.MODP_3072: (_MODP_3072_P, 384),
    DhId.MODP_4096: (_MODP_4096_P, 480),
}

#: group -> (curve, group order n, coordinate length). Orders from SEC 2 §2.4.2,
#: §2.5.1, §2.6.1 (FIPS 186-4 D.1.2.3, D.1.2.4, D.1.2.5); RFC 5903 §3.3: the
#: 521-bit coordinates take 66 octets.
_ECP: dict[DhId, tuple[ec.EllipticCurve, int, int]] = {
    DhId.ECP_256: (
        ec.SECP256R1(),
        0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551,
        32,
    ),
    DhId.ECP_384: (
        ec.SECP384R1(),
        int(
            "FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF"
            "581A0DB248B0A77AECEC196ACCC52973",
            16,
        ),
        48,
    ),
    DhId.ECP_521: (
        ec.SECP521R1(),
        int(
            "01FF" + "FFFFFFFF" * 7 + "FFFFFFFA51868783BF2F966B7FCC0148F709A5D0"
            "3BB5C9B8899C47AEBB6FB71E91386409",
            16,
        ),
        66,
    ),
}

_X25519_LEN = 32

_MODP_PARAMS = {group: dh.DHParameterNumbers(p, MODP_GENERATOR) for group, (p, _) in _MODP.items()}

SUPPORTED_GROUPS: tuple[DhId, ...] = (
    DhId.CURVE_25519,
    DhId.ECP_256,
    DhId.ECP_384,
    DhId.ECP_521,
    DhId.MODP_2048,
    DhId.MODP_3072,
    DhId.MODP_4096,
)


def ke_length(group: DhId) -> int:
    """Length in octets of the Key Exchange Data (and of the shared secret's
    encoding: for ECP the secret is half of it)."""
    if group in _ECP:
        return 2 * _ECP[group][2]
    if group in _MODP:
        return (_MODP[group][0].bit_length() + 7) // 8
    if group == DhId.CURVE_25519:
        return _X25519_LEN
    raise ValueError(f"unsupported Diffie-Hellman group {group!r}")


def _int_from(random: RandomBytes, nbytes: int) -> int:
    return int.from_bytes(random(nbytes), "big")


class DhKeyPair:
    """Our half of one Diffie-Hellman exchange. ``public`` is the KE data."""

    __slots__ = ("_private", "group", "public")

    def __init__(
        self,
        group: DhId,
        public: bytes,
        private: ec.EllipticCurvePrivateKey | x25519.X25519PrivateKey | dh.DHPrivateKey,
    ) -> None:
        self.group = group
        self.public = public
        self._private = private

    def __repr__(self) -> str:
        return f"DhKeyPair(group={self.group!r}, public={self.public.hex()[:16]}...)"

    def shared_secret(self, peer_public: bytes) -> bytes:
        """g^ir from the peer's KE data; InvalidKeyExchange if that is not valid."""
        expected = ke_length(self.group)
        if len(peer_public) != expected:
            raise InvalidKeyExchange(
                f"{self.group.name} KE data is {len(peer_public)} octets, not {expected}"
            )
        private = self._private
        if isinstance(private, ec.EllipticCurvePrivateKey):
            return _ecp_shared(private, peer_public)
        if isinstance(private, x25519.X25519PrivateKey):
            return _x25519_shared(private, peer_public)
        return _modp_shared(self.group, private, peer_public)


def _ecp_shared(private: ec.EllipticCurvePrivateKey, peer_public: bytes) -> bytes:
    # from_encoded_point checks the coordinates are below p and the point is on
    # the curve (SP 800-56A §5.6.2.3.4 partial validation; cofactor 1).
    try:
        peer = ec.EllipticCurvePublicKey.from_encoded_point(private.curve, b"\x04" + peer_public)
    except ValueError:
        raise InvalidKeyExchange("ECP KE data is not a point on the curve") from None
    return private.exchange(ec.ECDH(), peer)  # x coordinate, fixed width (RFC 5903 §9)


def _x25519_shared(private: x25519.X25519PrivateKey, peer_public: bytes) -> bytes:
    peer = x25519.X25519PublicKey.from_public_bytes(peer_public)
    try:
        # cryptography refuses an all-zero result (a small-order peer point),
        # as RFC 8031 §2.3 and RFC 7748 §6.1 require.
        return private.exchange(peer)
    except ValueError:
        raise InvalidKeyExchange("curve25519 KE data gives an all-zero secret") from None


def _modp_shared(group: DhId, private: dh.DHPrivateKey, peer_public: bytes) -> bytes:
    prime, _ = _MODP[group]
    y = int.from_bytes(peer_public, "big")
    # RFC 7296 §5 / SP 800-56A §5.6.2.3.1: 1 < y < p-1 (0, 1 and p-1 force the secret).
    if not 1 < y < prime - 1:
        raise InvalidKeyExchange(f"{group.name} KE value out of range")
    peer = dh.DHPublicNumbers(y, _MODP_PARAMS[group]).public_key()
    secret = private.exchange(peer)
    return secret.rjust(len(peer_public), b"\x00")


def dh_generate(group: DhId, random: RandomBytes) -> DhKeyPair:
    """A fresh key pair for ``group``; the private value comes from ``random`` only."""
    if group in _ECP:
        curve, order, size = _ECP[group]
        # 64 extra bits make the bias of the reduction negligible (FIPS 186-5 A.2.1).
        scalar = _int_from(random, size + 8) % (order - 1) + 1
        ec_key = ec.derive_private_key(scalar, curve)
        numbers = ec_key.public_key().public_numbers()
        public = numbers.x.to_bytes(size, "big") + numbers.y.to_bytes(size, "big")
        return DhKeyPair(group, public, ec_key)
    if group == DhId.CURVE_25519:
        x_key = x25519.X25519PrivateKey.from_private_bytes(random(_X25519_LEN))
        return DhKeyPair(group, x_key.public_key().public_bytes_raw(), x_key)
    if group in _MODP:
        prime, bits = _MODP[group]
        # Top bit set: every exponent has the full length, none is tiny.
        exponent = _int_from(random, bits // 8) | (1 << (bits - 1))
        y = pow(MODP_GENERATOR, exponent, prime)
        public_numbers = dh.DHPublicNumbers(y, _MODP_PARAMS[group])
        modp_key = dh.DHPrivateNumbers(exponent, public_numbers).private_key()
        return DhKeyPair(group, y.to_bytes(ke_length(group), "big"), modp_key)
    raise ValueError(f"unsupported Diffie-Hellman group {group!r}")
