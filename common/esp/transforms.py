"""ESP (RFC 4303) tunnel-mode transform for one SA, sans-I/O.

Rules of this file:
- ``OutboundSA.protect(inner_ip_packet) -> esp_bytes`` and
  ``InboundSA.unprotect(esp_bytes) -> inner_ip_packet``; ``esp_bytes`` is
  ``SPI | seq | IV | ciphertext | ICV`` with no outer IP/UDP header.
- Crypto objects are built once per SA; the per-packet path is a few struct
  packs, one AEAD call and byte concatenation (no per-packet object graphs).
- Inbound order: replay check, then authenticate/decrypt, then record
  (strongSwan ``libipsec/esp_packet.c``), so a forged packet never moves the
  window.  Every ICV/tag failure is ``IntegrityError``, every unparsable packet
  ``MalformedMessage``; nothing else escapes for bad bytes.
- Outbound sequence numbers start at ``initial_seq`` and never wrap
  (RFC 4303 §3.3.3): ``RekeyRequested`` is queued ``rekey_margin`` packets
  before the end, ``SequenceExhausted`` is raised at the end.
- IVs are ``sender_id || counter`` (``common.esp.iv``), unique across members;
  AES-CBC sends that value encrypted (SP 800-38A Appendix C), never in the
  clear, because a CBC IV must be unpredictable (RFC 3602 §2.4).
- Two implementations of the byte work, one SA state: the compiled
  ``common.esp._esp_fast`` (OpenSSL, built when possible) and the pure-Python
  path below, which stays the reference and the fallback.  They produce
  identical bytes; ``IPSEC_CLUSTER_PURE_ESP=1`` forces the pure path.
"""

from __future__ import annotations

import hmac
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.hmac import HMAC

from common.errors import (
    IntegrityError,
    LocalProtocolError,
    MalformedMessage,
    ReplayError,
    SequenceExhausted,
)
from common.esp.iv import COUNTER_LIMIT, IvGenerator, check_sender_id
from common.esp.replay import DEFAULT_WINDOW_SIZE, ReplayState, ReplayWindow

if TYPE_CHECKING:
    from common.esp._esp_fast import SaCipher

PURE_ESP_ENV = "IPSEC_CLUSTER_PURE_ESP"   # "1": use the pure-Python path only


def _load_compiled() -> type[SaCipher] | None:
    """The compiled byte primitive, unless it was not built or is switched off."""
    if os.environ.get(PURE_ESP_ENV) == "1":
        return None
    try:
        from common.esp._esp_fast import SaCipher
    except ImportError:   # no compiler or no OpenSSL headers at install time
        return None
    return SaCipher


# Read when an SA is created: each SA object keeps one implementation for life.
_compiled = _load_compiled()
#: True when SAs use the compiled byte primitive (the default when it was built).
FAST_PATH = _compiled is not None

__all__ = [
    "FAST_PATH",
    "PURE_ESP_ENV",
    "TRANSFORMS",
    "AesCtr",
    "CbcHmac",
    "CtrHmac",
    "Hmac",
    "InboundSA",
    "IntegrityError",
    "MalformedMessage",
    "OutboundSA",
    "RekeyRequested",
    "ReplayError",
    "SequenceExhausted",
    "Transform",
]

ESP_HEADER_SIZE = 8       # SPI + sequence number (RFC 4303 §2)
IV_SIZE = 8               # RFC 4106 §3.1, RFC 3686 §3.1, RFC 7634 §2
CBC_IV_SIZE = 16          # RFC 3602 §3: one AES block
AES_BLOCK_SIZE = 16
ICV_SIZE = 16             # GCM and Poly1305 16-byte tags; HMAC-SHA-256-128 (RFC 4868 §2.3)
SALT_SIZE = 4             # RFC 4106 §8.1 salt, RFC 3686 §5.1 nonce, RFC 7634 §4 salt
# The smallest packet of any transform (GCM, CTR, ChaCha20): header, IV, Pad
# Length + Next Header, ICV.  Each SA checks its own (Transform.min_packet_size).
MIN_PACKET_SIZE = ESP_HEADER_SIZE + IV_SIZE + 2 + ICV_SIZE
# The CBC IV is E_K(_CBC_IV_PREFIX | sender_id | counter): SP 800-38A Appendix C's
# first method (the forward cipher under the SA's key applied to a nonce).  The
# prefix keeps these blocks apart from anything else this design encrypts.
_CBC_IV_PREFIX = b"ESP-CBC\x00"
MIN_SPI = 256             # 1..255 reserved by IANA (RFC 4303 §2.1)
MAX_SEQ_32 = 0xFFFF_FFFF
MAX_SEQ_64 = 0xFFFF_FFFF_FFFF_FFFF
DEFAULT_REKEY_MARGIN = 1 << 26   # packets left when RekeyRequested is queued
IV_BLOCK = 1 << 16               # IVs reserved from the generator at a time
NEXT_HEADER_IPV4 = 4
NEXT_HEADER_IPV6 = 41

_SPI_SEQ = struct.Struct("!II")
_HEADER = struct.Struct("!IIQ")    # SPI | seq | IV as it goes on the wire
_NONCE = struct.Struct("!IQ")      # salt | IV: the 12-byte GCM nonce (RFC 4106 §4)
_ESN_AAD = struct.Struct("!III")   # SPI | seq high | seq low (RFC 4106 §5)
_U32 = struct.Struct("!I")
_SPI_SEQ_IV16 = 24                 # SPI | seq | 16-byte CBC IV
_IV = struct.Struct("!Q")
_COUNTER_1 = b"\x00\x00\x00\x01"   # RFC 3686 §4: first block counter

# RFC 4303 §2.4: padding 1, 2, 3, ... so that Pad Length and Next Header end
# on a 4-byte boundary (GCM, CTR and ChaCha20 have a block size of 1), or on a
# 16-byte one for AES-CBC.  The trailer for an inner packet of length n is
# _TRAILERS[version nibble][n % 4], or _CBC_TRAILERS[version nibble][n % 16].
_PADS = tuple(bytes(range(1, k + 1)) for k in range(256))


def _trailers(next_header: int, align: int) -> tuple[bytes, ...]:
    def one(rem: int) -> bytes:
        pad = (-(rem + 2)) % align
        return _PADS[pad] + bytes((pad, next_header))
    return tuple(one(rem) for rem in range(align))


def _trailer_table(align: int) -> tuple[tuple[bytes, ...] | None, ...]:
    return tuple(_trailers(NEXT_HEADER_IPV4, align) if v == 4
                 else _trailers(NEXT_HEADER_IPV6, align) if v == 6 else None
                 for v in range(16))


_TRAILERS = _trailer_table(4)
_CBC_TRAILERS = _trailer_table(AES_BLOCK_SIZE)
# What a decrypted payload must end with, by its inner IP version nibble and
# Pad Length: the padding 1, 2, 3, ..., Pad Length and the matching Next Header.
_BAD_TRAILER = ("ESP trailer is not padding 1, 2, 3, ..., pad length, and next header "
                "4 (IPv4) or 41 (IPv6) matching the inner packet")
_TAILS: tuple[tuple[bytes, ...] | None, ...] = tuple(
    tuple(_PADS[k] + bytes((k, NEXT_HEADER_IPV4 if v == 4 else NEXT_HEADER_IPV6))
          for k in range(256)) if v in (4, 6) else None
    for v in range(16))


GCM = "gcm"                 # AES-GCM, RFC 4106
CHACHA = "chacha20poly1305" # ChaCha20-Poly1305, RFC 7634
CTR = "ctr"                 # AES-CTR, RFC 3686, + HMAC
CBC = "cbc"                 # AES-CBC, RFC 3602, + HMAC

#: HMAC hash -> (key bytes, ICV bytes): RFC 2404 §2 (SHA-1-96), RFC 4868 §2.1
#: (SHA-2: key = hash output length, ICV = half of it).
HMACS: dict[str, tuple[int, int]] = {
    "sha1": (20, 12),
    "sha256": (32, 16),
    "sha384": (48, 24),
    "sha512": (64, 32),
}


@dataclass(frozen=True, slots=True)
class Transform:
    """One ESP transform and the keymat layout IKEv2 hands out for it."""

    name: str
    cipher: str            # GCM, CHACHA, CTR or CBC
    key_size: int          # encryption key bytes
    integ: str | None = None   # the HMAC's hash for CTR and CBC; None for AEAD

    @property
    def aead(self) -> bool:
        return self.integ is None

    @property
    def integ_key_size(self) -> int:
        return 0 if self.integ is None else HMACS[self.integ][0]

    @property
    def icv_size(self) -> int:
        return ICV_SIZE if self.integ is None else HMACS[self.integ][1]

    @property
    def salt_size(self) -> int:
        """RFC 7296 §2.17: a 4-byte salt/nonce after the key, except for CBC."""
        return 0 if self.cipher == CBC else SALT_SIZE

    @property
    def iv_size(self) -> int:
        return CBC_IV_SIZE if self.cipher == CBC else IV_SIZE

    @property
    def align(self) -> int:
        """RFC 4303 §2.4: the ciphertext is a multiple of the cipher's block
        size (16 for CBC) and of 4; stream and AEAD ciphers have block size 1."""
        return AES_BLOCK_SIZE if self.cipher == CBC else 4

    @property
    def min_packet_size(self) -> int:
        """Header, IV, the smallest ciphertext (Pad Length + Next Header, or one
        CBC block), ICV."""
        body = AES_BLOCK_SIZE if self.cipher == CBC else 2
        return ESP_HEADER_SIZE + self.iv_size + body + self.icv_size

    @property
    def keymat_size(self) -> int:
        return self.key_size + self.salt_size + self.integ_key_size

    def keymat_layout(self) -> str:
        if self.aead:
            return f"{self.key_size} key + {SALT_SIZE} salt"
        if self.cipher == CBC:
            return f"{self.key_size} key + {self.integ_key_size} integrity"
        return f"{self.key_size} key + {SALT_SIZE} nonce + {self.integ_key_size} integrity"


TRANSFORMS: dict[str, Transform] = {
    t.name: t for t in (
        Transform("aes128gcm16", GCM, 16),
        Transform("aes256gcm16", GCM, 32),
        Transform("chacha20poly1305", CHACHA, 32),
        Transform("aes128ctr-sha256", CTR, 16, "sha256"),
        Transform("aes256ctr-sha256", CTR, 32, "sha256"),
        *(Transform(f"aes{bits}cbc-{h}", CBC, bits // 8, h)
          for bits in (128, 256) for h in HMACS),
    )
}


@dataclass(frozen=True, slots=True)
class RekeyRequested:
    """The outbound SA reached its soft limit: negotiate a new child SA now."""

    spi: int
    next_seq: int
    remaining: int


def _transform(name: str, keymat: bytes) -> Transform:
    transform = TRANSFORMS.get(name)
    if transform is None:
        raise ValueError(f"unknown ESP transform {name!r}; expected one of "
                         f"{', '.join(TRANSFORMS)}")
    if len(keymat) != transform.keymat_size:
        raise ValueError(f"{name} needs keymat of {transform.keymat_size} bytes "
                         f"({transform.keymat_layout()}), got {len(keymat)}")
    return transform


def _check_spi(spi: int) -> int:
    if isinstance(spi, bool) or not isinstance(spi, int) or not MIN_SPI <= spi <= MAX_SEQ_32:
        raise ValueError(f"spi must be an int in {MIN_SPI}..{MAX_SEQ_32:#x} "
                         f"(1..255 are reserved), got {spi!r}")
    return spi


# RFC 3686 counter blocks 1..k for short payloads, built with one multiply:
# (nonce|IV|0) * _REPEAT[k] + _COUNTERS[k] is the k blocks nonce|IV|1 ... nonce|IV|k.
SHORT_CTR_BLOCKS = 8   # up to here one ECB call is faster than the GCM route
_REPEAT = tuple(sum(1 << (128 * j) for j in range(k)) for k in range(SHORT_CTR_BLOCKS + 1))
_COUNTERS = tuple(sum((j + 1) << (128 * (k - 1 - j)) for j in range(k))
                  for k in range(SHORT_CTR_BLOCKS + 1))


class AesCtr:
    """AES-CTR as RFC 3686: counter block ``nonce(4) | IV(8) | counter(4)`` from 1.

    Built once per SA; no ``Cipher`` object per packet (that costs several µs).
    Two measured routes (bench/, docs/performance.md):

    - up to ``SHORT_CTR_BLOCKS`` blocks: one ECB call over the counter blocks,
      XOR'd in as one integer;
    - longer: blocks 2.. come from AES-GCM with the 12-byte nonce ``nonce | IV``,
      which encrypts from ``inc32(J0) = nonce | IV | 2`` (SP 800-38D §7.1), exactly
      RFC 3686's keystream from block 2 (its tag is dropped); block 1 is one ECB
      block.  ECB contexts stay open and keep taking ``update`` calls.
    """

    __slots__ = ("_ecb", "_gcm", "_nonce")

    def __init__(self, key: bytes, nonce: bytes) -> None:
        if len(nonce) != SALT_SIZE:
            raise ValueError(f"AES-CTR nonce must be {SALT_SIZE} bytes, got {len(nonce)}")
        self._nonce = bytes(nonce)
        self._gcm = AESGCM(key)
        self._ecb = Cipher(algorithms.AES(key), modes.ECB()).encryptor()  # noqa: S305

    def crypt(self, iv: bytes, data: bytes | memoryview) -> bytes:
        """Encrypt or decrypt ``data`` (the same operation) under the 8-byte ``iv``."""
        nonce_iv = self._nonce + iv
        n = len(data)
        blocks = (n + 15) >> 4
        if blocks <= SHORT_CTR_BLOCKS:
            base = int.from_bytes(nonce_iv) << 32
            counters = (base * _REPEAT[blocks] + _COUNTERS[blocks]).to_bytes(blocks << 4)
            stream = int.from_bytes(self._ecb.update(counters)) >> (((blocks << 4) - n) << 3)
            return (int.from_bytes(data) ^ stream).to_bytes(n)
        block1 = int.from_bytes(self._ecb.update(nonce_iv + _COUNTER_1))
        head = (int.from_bytes(data[:16]) ^ block1).to_bytes(16)
        return head + self._gcm.encrypt(nonce_iv, data[16:], None)[:-16]


_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1, "sha256": hashes.SHA256, "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}


class Hmac:
    """HMAC truncated to the ICV (RFC 2404 §2, RFC 4868 §2.1), keyed once and
    copied per packet.  With ESN the unsent high half of the sequence number
    is authenticated after the packet (RFC 4303 §2.2.1, §3.3.2.1)."""

    __slots__ = ("_mac", "size")

    def __init__(self, integ_key: bytes, digest: str) -> None:
        self._mac = HMAC(integ_key, _HASHES[digest]())
        self.size = HMACS[digest][1]

    def icv(self, data: bytes | memoryview, seq_high: bytes | None) -> bytes:
        mac = self._mac.copy()
        mac.update(data)
        if seq_high is not None:
            mac.update(seq_high)
        return mac.finalize()[:self.size]

    def check(self, view: memoryview, seq_high: bytes | None) -> int:
        """The end of the authenticated part; ``IntegrityError`` if the ICV fails."""
        end = len(view) - self.size
        if not hmac.compare_digest(self.icv(view[:end], seq_high), view[end:]):
            raise IntegrityError("ESP ICV check failed")
        return end


class CtrHmac:
    """AES-CTR (RFC 3686) + HMAC (RFC 4868), encrypt-then-MAC (RFC 4303 §3.3.4)."""

    __slots__ = ("_ctr", "_mac")

    def __init__(self, key: bytes, nonce: bytes, integ_key: bytes,
                 digest: str = "sha256") -> None:
        self._ctr = AesCtr(key, nonce)
        self._mac = Hmac(integ_key, digest)

    def seal(self, spi_seq: bytes, iv: int, payload: bytes,
             seq_high: bytes | None) -> bytes:
        """``SPI | seq | IV | ciphertext | ICV``; ``spi_seq`` is the first 8 bytes."""
        iv8 = _IV.pack(iv)
        body = spi_seq + iv8 + self._ctr.crypt(iv8, payload)
        return body + self._mac.icv(body, seq_high)

    def open(self, view: memoryview, seq_high: bytes | None) -> bytes:
        """Verify the ICV of a whole ESP packet, then decrypt its payload."""
        end = self._mac.check(view, seq_high)
        return self._ctr.crypt(bytes(view[8:16]), view[16:end])


class CbcHmac:
    """AES-CBC (RFC 3602) + HMAC (RFC 2404, RFC 4868), encrypt-then-MAC.

    The 16-byte IV must be unpredictable (RFC 3602 §2.4).  It is
    ``E_K(prefix | sender_id | counter)`` under the SA's own key: SP 800-38A
    Appendix C, first method.  The nonce never repeats (it is the same
    ``sender_id || counter`` as the GCM IV, unique across members), and without
    K its encryption cannot be told from random; no RNG is needed per packet
    and a member that takes the SA over derives the same IVs from the keymat.
    Decryption is one ECB call over all blocks XOR'd with the shifted
    ciphertext (CBC decryption is parallel).  Encryption keeps ONE CBC
    encryptor open for the SA's life (a mode object per packet costs tens of
    µs): its chaining value is the last ciphertext block it produced, C_prev,
    so feeding ``P1 ^ IV ^ C_prev`` as the first block yields E_K(P1 ^ IV),
    exactly the first block of CBC under ``IV``; the rest chains as usual.
    """

    __slots__ = ("_cbc", "_ecb_dec", "_ecb_enc", "_last", "_mac")

    def __init__(self, key: bytes, integ_key: bytes, digest: str) -> None:
        aes = algorithms.AES(key)
        self._ecb_enc = Cipher(aes, modes.ECB()).encryptor()  # noqa: S305
        self._ecb_dec = Cipher(aes, modes.ECB()).decryptor()  # noqa: S305
        self._cbc = Cipher(aes, modes.CBC(bytes(AES_BLOCK_SIZE))).encryptor()
        self._last = 0   # the running encryptor's chaining value (its IV at first)
        self._mac = Hmac(integ_key, digest)

    def iv(self, counter: int) -> bytes:
        """The wire IV for the ``sender_id || counter`` value ``counter``."""
        return self._ecb_enc.update(_CBC_IV_PREFIX + _IV.pack(counter))

    def seal(self, spi_seq: bytes, iv: int, payload: bytes,
             seq_high: bytes | None) -> bytes:
        """``SPI | seq | IV | ciphertext | ICV``; ``payload`` is whole blocks."""
        iv16 = self.iv(iv)
        first = int.from_bytes(payload[:AES_BLOCK_SIZE]) ^ int.from_bytes(iv16) ^ self._last
        ct = self._cbc.update(first.to_bytes(AES_BLOCK_SIZE) + payload[AES_BLOCK_SIZE:])
        self._last = int.from_bytes(ct[-AES_BLOCK_SIZE:])
        body = spi_seq + iv16 + ct
        return body + self._mac.icv(body, seq_high)

    def open(self, view: memoryview, seq_high: bytes | None) -> bytes:
        """Verify the ICV of a whole ESP packet (whole blocks), then decrypt."""
        end = self._mac.check(view, seq_high)
        n = end - _SPI_SEQ_IV16
        # P_i = D_K(C_i) XOR C_(i-1), with C_0 the IV (RFC 3602 §2.3).
        decrypted = int.from_bytes(self._ecb_dec.update(view[_SPI_SEQ_IV16:end]))
        return (decrypted ^ int.from_bytes(view[8:end - AES_BLOCK_SIZE])).to_bytes(n)


_Aead = AESGCM | ChaCha20Poly1305
_Etm = CtrHmac | CbcHmac


def _suites(t: Transform, keymat: bytes, spi: int, esn: bool
            ) -> tuple[_Aead | None, _Etm | None, SaCipher | None]:
    """The per-SA crypto objects for ``keymat`` (RFC 7296 §2.17 order: key,
    salt/nonce except for CBC, integrity key): the compiled primitive when
    available, else the pure-Python objects."""
    key = bytes(keymat[:t.key_size])
    salt = bytes(keymat[t.key_size:t.key_size + t.salt_size])
    integ_key = bytes(keymat[t.key_size + t.salt_size:])
    if _compiled is not None:
        return None, None, _compiled(t.cipher, key, salt, integ_key, t.integ or "",
                                     spi, esn)
    if t.cipher == GCM:
        return AESGCM(key), None, None
    if t.cipher == CHACHA:
        return ChaCha20Poly1305(key), None, None
    if t.integ is None:  # unreachable: TRANSFORMS gives CTR and CBC an HMAC
        raise LocalProtocolError(f"{t.name} has no integrity algorithm")
    if t.cipher == CTR:
        return None, CtrHmac(key, salt, integ_key, t.integ), None
    return None, CbcHmac(key, integ_key, t.integ), None


def _check_inner(packet: bytes) -> None:
    """``MalformedMessage`` unless ``packet`` starts like IPv4 or IPv6."""
    if not packet:
        raise MalformedMessage("inner packet is empty")
    if _TRAILERS[packet[0] >> 4] is None:
        raise MalformedMessage(f"inner packet is not IPv4/IPv6 (version {packet[0] >> 4})")


#: What a batch gives in place of a packet the per-packet call would refuse.
OutboundRefusal = MalformedMessage | SequenceExhausted
InboundRefusal = ReplayError | IntegrityError | MalformedMessage


class OutboundSA:
    """Encrypts inner IP packets for one outbound child SA."""

    __slots__ = (
        "_aead",
        "_check_at",
        "_etm",
        "_fast",
        "_initial_seq",
        "_iv",
        "_iv_block_end",
        "_iv_offset",
        "_last_seq",
        "_salt",
        "_seq",
        "_soft_seq",
        "_trailers",
        "esn",
        "events",
        "octets",
        "rekey_requested",
        "spi",
        "transform",
    )

    def __init__(self, spi: int, transform: str, keymat: bytes, sender_id: int,
                 esn: bool = False, initial_seq: int = 1,
                 initial_iv_counter: int | None = None,
                 rekey_margin: int = DEFAULT_REKEY_MARGIN) -> None:
        t = _transform(transform, keymat)
        self.spi = _check_spi(spi)
        self.transform = t.name
        self.esn = bool(esn)
        max_seq = MAX_SEQ_64 if self.esn else MAX_SEQ_32
        if isinstance(initial_seq, bool) or not isinstance(initial_seq, int) \
                or not 1 <= initial_seq <= max_seq:
            raise ValueError(f"initial_seq must be an int in 1..{max_seq:#x}, got {initial_seq!r}")
        if initial_iv_counter is None:
            if initial_seq >= COUNTER_LIMIT:
                raise ValueError("initial_seq is beyond 48 bits: pass initial_iv_counter")
            initial_iv_counter = initial_seq
        self._iv = IvGenerator(check_sender_id(sender_id), initial_iv_counter)
        if isinstance(rekey_margin, bool) or not isinstance(rekey_margin, int) \
                or rekey_margin < 0:
            raise ValueError(f"rekey_margin must be a non-negative int, got {rekey_margin!r}")
        # The last usable sequence number: the end of the sequence space or of
        # the IV space, whichever comes first.  Never wrap (RFC 4303 §3.3.3).
        self._last_seq = min(max_seq, initial_seq + self._iv.remaining - 1)
        self._soft_seq = max(initial_seq, self._last_seq - rekey_margin)
        self._seq = initial_seq
        self._iv_offset = 0
        self._iv_block_end = initial_seq   # no IVs reserved yet
        self._check_at = initial_seq
        self._initial_seq = initial_seq
        self.octets = 0
        self.events: list[RekeyRequested] = []
        self.rekey_requested = False
        self._salt = int.from_bytes(keymat[t.key_size:t.key_size + t.salt_size])
        self._trailers = _CBC_TRAILERS if t.cipher == CBC else _TRAILERS
        self._aead, self._etm, self._fast = _suites(t, keymat, self.spi, self.esn)

    @property
    def next_seq(self) -> int:
        """The sequence number the next packet gets (export it for a takeover)."""
        return self._seq

    @property
    def packets(self) -> int:
        """Packets protected so far by this SA object."""
        return self._seq - self._initial_seq

    @property
    def last_seq(self) -> int:
        return self._last_seq

    @property
    def next_iv_counter(self) -> int:
        """The 48-bit IV counter the next packet gets."""
        if self._seq < self._iv_block_end:
            return (self._iv_offset + self._seq) & (COUNTER_LIMIT - 1)
        return self._iv.counter

    @property
    def sender_id(self) -> int:
        return self._iv.sender_id

    def protect(self, packet: bytes) -> bytes:
        """ESP-encapsulate one inner IPv4/IPv6 packet (tunnel mode)."""
        fast = self._fast
        if fast is None:
            return self._protect_pure(packet)
        seq = self._seq
        if seq >= self._check_at:
            _check_inner(packet)       # a bad packet is refused before any limit
            self._at_checkpoint(seq)
        # The C primitive refuses a non-IP packet before the number is spent.
        esp = fast.seal(seq, self._iv_offset + seq, packet)
        self._seq = seq + 1
        self.octets += len(packet)
        return esp

    def _protect_pure(self, packet: bytes) -> bytes:
        """The reference implementation of ``protect`` (and the fallback)."""
        try:
            trailers = self._trailers[packet[0] >> 4]
        except IndexError:
            raise MalformedMessage("inner packet is empty") from None
        if trailers is None:
            raise MalformedMessage(f"inner packet is not IPv4/IPv6 (version {packet[0] >> 4})")
        seq = self._seq
        if seq >= self._check_at:
            self._at_checkpoint(seq)
        self._seq = seq + 1
        n = len(packet)
        self.octets += n
        payload = packet + trailers[n % len(trailers)]
        iv = self._iv_offset + seq
        aead = self._aead
        if aead is not None:
            if self.esn:
                header = _HEADER.pack(self.spi, seq & MAX_SEQ_32, iv)
                aad = _ESN_AAD.pack(self.spi, seq >> 32, seq & MAX_SEQ_32)
                return header + aead.encrypt(_NONCE.pack(self._salt, iv), payload, aad)
            header = _HEADER.pack(self.spi, seq, iv)
            return header + aead.encrypt(_NONCE.pack(self._salt, iv), payload, header[:8])
        etm = self._etm
        if etm is None:  # unreachable: _suites sets exactly one of the three
            raise LocalProtocolError("SA has no cipher")
        return etm.seal(_SPI_SEQ.pack(self.spi, seq & MAX_SEQ_32), iv, payload,
                        _U32.pack(seq >> 32) if self.esn else None)

    def seal_batch(self, packets: Sequence[bytes]) -> list[bytes | OutboundRefusal]:
        """``protect`` of each packet in order, as N calls would do it: the same
        sequence numbers, IVs, octets and events.  A packet ``protect`` would
        refuse stands in the list as the exception it would raise
        (``MalformedMessage``: no number spent; ``SequenceExhausted``), and the
        batch goes on.  The compiled path seals each run of packets up to the
        next checkpoint (IV block, soft limit, end) in one C call."""
        fast = self._fast
        if fast is None:
            return [self._protect_or_refusal(packet) for packet in packets]
        out: list[bytes | OutboundRefusal] = []
        i, n = 0, len(packets)
        while i < n:
            seq = self._seq
            if seq >= self._check_at:
                try:
                    _check_inner(packets[i])   # refused before any limit, as in protect
                    self._at_checkpoint(seq)
                except (MalformedMessage, SequenceExhausted) as exc:
                    out.append(exc)
                    i += 1
                    continue
            chunk = packets[i:i + self._check_at - seq]
            sealed = fast.seal_batch(seq, self._iv_offset + seq, chunk)
            octets = sum(map(len, chunk))
            spent = len(chunk)
            if MalformedMessage in map(type, sealed):   # rare: C-level scan first
                refused = [len(p) for p, e in zip(chunk, sealed, strict=True)
                           if not isinstance(e, bytes)]
                spent -= len(refused)
                octets -= sum(refused)
            self._seq = seq + spent
            self.octets += octets
            out.extend(sealed)
            i += len(chunk)
        return out

    def _protect_or_refusal(self, packet: bytes) -> bytes | OutboundRefusal:
        try:
            return self.protect(packet)
        except (MalformedMessage, SequenceExhausted) as exc:
            return exc

    def _at_checkpoint(self, seq: int) -> None:
        """Slow path: exhaustion, the soft limit, or a new block of IVs."""
        if seq > self._last_seq:
            raise SequenceExhausted(
                f"outbound SA {self.spi:#010x} used its last sequence number "
                f"{self._last_seq}; rekey it (RFC 4303 §3.3.3)")
        if seq >= self._soft_seq and not self.rekey_requested:
            self.rekey_requested = True
            self.events.append(RekeyRequested(self.spi, seq, self._last_seq - seq + 1))
        if seq >= self._iv_block_end:
            count = min(IV_BLOCK, self._last_seq - seq + 1)
            first = self._iv.reserve(count)
            self._iv_offset = first - seq
            self._iv_block_end = seq + count
        checkpoints = [self._iv_block_end, self._last_seq + 1]
        if not self.rekey_requested:
            checkpoints.append(self._soft_seq)
        self._check_at = min(checkpoints)

    def __repr__(self) -> str:
        return (f"OutboundSA(spi={self.spi:#010x}, transform={self.transform!r}, "
                f"next_seq={self._seq})")


class InboundSA:
    """Authenticates and decrypts ESP packets for one inbound child SA."""

    __slots__ = ("_aead", "_block", "_etm", "_fast", "_min_size", "_salt", "esn", "octets",
                 "packets", "spi", "transform", "window")

    def __init__(self, spi: int, transform: str, keymat: bytes,
                 replay_window: int = DEFAULT_WINDOW_SIZE, esn: bool = False) -> None:
        t = _transform(transform, keymat)
        self.spi = _check_spi(spi)
        self.transform = t.name
        self.esn = bool(esn)
        self.window = ReplayWindow(replay_window)
        self.packets = 0
        self.octets = 0
        self._salt = int.from_bytes(keymat[t.key_size:t.key_size + t.salt_size])
        self._min_size = t.min_packet_size
        # CBC: the ciphertext (what lies between IV and ICV) is whole blocks.
        self._block = (AES_BLOCK_SIZE, ESP_HEADER_SIZE + t.iv_size + t.icv_size) \
            if t.cipher == CBC else None
        self._aead, self._etm, self._fast = _suites(t, keymat, self.spi, self.esn)

    def export_window(self) -> ReplayState:
        return self.window.export_state()

    def import_window(self, state: ReplayState) -> None:
        self.window.import_state(state)

    def unprotect(self, packet: bytes) -> bytes:
        """The inner IP packet of one ESP packet (no outer IP/UDP header)."""
        fast = self._fast
        if fast is None:
            return self._unprotect_pure(packet)
        seq = fast.peek(packet)                             # size, SPI
        window = self.window
        if self.esn:
            seq = window.infer_esn(seq)
        if seq <= window.highest:                           # 1. replay check
            window.check(seq)
        inner = fast.open(packet, seq >> 32)                # 2. authenticate + decrypt
        window.record(seq)                                  # 3. record
        if inner is None:   # authentic, but not padding 1, 2, ... + next header 4/41
            raise MalformedMessage(_BAD_TRAILER)
        self.packets += 1
        self.octets += len(inner)
        return inner

    def open_batch(self, packets: Sequence[bytes]) -> list[bytes | InboundRefusal]:
        """``unprotect`` of each packet in order, as N calls would do it: the
        same inner packets, window, ``packets`` and ``octets``.  A packet
        ``unprotect`` would refuse stands in the list as the exception it would
        raise (``ReplayError``, ``IntegrityError``, ``MalformedMessage``); it
        moves the window exactly as there (a forged or replayed one never does).
        The compiled path authenticates and decrypts the whole burst in one C
        call, then walks it once here for the replay window and counters."""
        fast = self._fast
        if fast is None:
            return [self._unprotect_or_refusal(packet) for packet in packets]
        window = self.window
        highs = self._guess_highs(packets) if self.esn else None
        opened = fast.open_batch(packets, highs)
        out: list[bytes | InboundRefusal] = []
        accepted = octets = 0
        for i, (seq, result) in enumerate(opened):
            if seq < 0:                                     # size, SPI
                out.append(result)   # type: ignore[arg-type]  # the MalformedMessage
                continue
            if highs is not None:
                seq = window.infer_esn(seq)
            if seq <= window.highest:                       # 1. replay check
                try:
                    window.check(seq)
                except ReplayError as exc:
                    out.append(exc)
                    continue
            if highs is not None and seq >> 32 != highs[i]:
                # The guess ahead assumed an earlier packet of the burst would
                # pass: open this one again under the high half the window gives.
                try:
                    result = fast.open(packets[i], seq >> 32)
                except (IntegrityError, MalformedMessage) as exc:
                    result = exc
            if isinstance(result, BaseException):           # 2. authenticate + decrypt
                out.append(result)
                continue
            window.record(seq)                              # 3. record
            if result is None:
                out.append(MalformedMessage(_BAD_TRAILER))
                continue
            accepted += 1
            octets += len(result)
            out.append(result)
        self.packets += accepted
        self.octets += octets
        return out

    def _guess_highs(self, packets: Sequence[bytes]) -> list[int]:
        """ESN: the high half of each packet's sequence number, guessed ahead
        as if every earlier packet of the burst authenticates (the walk in
        ``open_batch`` checks each guess against the real window)."""
        window = self.window
        top = window.highest
        highs = []
        for packet in packets:
            if len(packet) < ESP_HEADER_SIZE:
                highs.append(0)
                continue
            seq = window.infer_esn(_U32.unpack_from(packet, 4)[0], top)
            highs.append(seq >> 32)
            top = max(top, seq)
        return highs

    def _unprotect_or_refusal(self, packet: bytes) -> bytes | InboundRefusal:
        try:
            return self.unprotect(packet)
        except (ReplayError, IntegrityError, MalformedMessage) as exc:
            return exc

    def _unprotect_pure(self, packet: bytes) -> bytes:
        """The reference implementation of ``unprotect`` (and the fallback)."""
        n = len(packet)
        if n < self._min_size:
            raise MalformedMessage(f"ESP packet too short: {n} bytes, "
                                   f"need at least {self._min_size}")
        if self._block is not None and (n - self._block[1]) % self._block[0]:
            raise MalformedMessage("ESP ciphertext is not a whole number of blocks")
        spi, seq, iv = _HEADER.unpack_from(packet)
        if spi != self.spi:
            raise MalformedMessage(f"ESP packet for SPI {spi:#010x} reached SA {self.spi:#010x}")
        window = self.window
        seq_low = seq
        if self.esn:
            seq = window.infer_esn(seq)
        if seq <= window.highest:                           # 1. replay check
            window.check(seq)
        aead = self._aead
        if aead is not None:                                # 2. authenticate + decrypt
            aad = _ESN_AAD.pack(spi, seq >> 32, seq_low) if self.esn else packet[:8]
            try:
                plain = aead.decrypt(_NONCE.pack(self._salt, iv), packet[16:], aad)
            except InvalidTag:
                raise IntegrityError(f"ESP ICV check failed (SPI {spi:#010x})") from None
        elif self._etm is not None:
            plain = self._etm.open(memoryview(packet),
                                   _U32.pack(seq >> 32) if self.esn else None)
        else:  # unreachable: _suites sets exactly one of the three
            raise LocalProtocolError("SA has no cipher")
        window.record(seq)                                  # 3. record
        # RFC 4303 §2.4-2.6: padding 1, 2, 3, ..., Pad Length, Next Header
        # matching the inner packet's IP version.
        end = len(plain) - 2 - plain[-2]
        if end < 1:
            raise MalformedMessage(f"ESP pad length {plain[-2]} exceeds the payload")
        tails = _TAILS[plain[0] >> 4]
        if tails is None or not plain.endswith(tails[plain[-2]]):
            raise MalformedMessage(_BAD_TRAILER)
        self.packets += 1
        self.octets += end
        return plain[:end]

    def __repr__(self) -> str:
        return (f"InboundSA(spi={self.spi:#010x}, transform={self.transform!r}, "
                f"highest={self.window.highest})")

