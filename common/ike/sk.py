"""Protection of the Encrypted (SK) payload, RFC 7296 §3.14, one direction.

An IKE SA holds two ``SkCipher``s: (SK_ei, SK_ai) for what the original
initiator sends and (SK_er, SK_ar) for what the responder sends.

Rules of this file:
- No randomness of its own: the caller passes the IV (for AES-GCM and
  ChaCha20-Poly1305 it must never repeat under one key, e.g. a sender-id ||
  counter; for AES-CBC it must be unpredictable, i.e. random).
- ``open`` raises ``IntegrityError`` for every authentication failure, whatever
  failed, and ``MalformedMessage`` only for sizes that cannot be right or a
  bad Pad Length inside an authenticated plaintext.
- Key-dependent objects (``AESGCM``, the AES algorithm, the keyed HMAC) are
  built once per ``SkCipher``; only the CBC mode object is per message, since
  it holds the IV. Keys never appear in reprs.

Layouts (``aad`` is every byte of the message before the IV: the IKE header,
any payloads before SK, and the SK generic payload header):
- ENCR_AES_GCM_16 (RFC 5282 §3-§5): sk_e = key || 4-byte salt; nonce = salt ||
  8-byte IV; body = IV || ciphertext || 16-byte tag; integ must be NONE.
- ENCR_CHACHA20_POLY1305 (RFC 7634 §3, the RFC 5282 layout): sk_e = 32-byte
  key || 4-byte salt; nonce = salt || 8-byte IV; 16-byte tag; integ NONE.
- ENCR_AES_CBC + AUTH_HMAC_SHA1_96 / AUTH_HMAC_SHA2_* (RFC 7296 §3.14, RFC 2404,
  RFC 4868): body = 16-byte IV || ciphertext || ICV, where ICV = HMAC(SK_a,
  aad || IV || ciphertext) truncated.
The plaintext in both cases is payloads || padding || Pad Length (1 octet).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from common.errors import IntegrityError, MalformedMessage
from common.ike.constants import EncrId, IntegId

AES_KEY_BITS = (128, 192, 256)
AES_BLOCK_LEN = 16
GCM_SALT_LEN = 4  # RFC 5282 §7.1
GCM_IV_LEN = 8  # RFC 5282 §3.1
GCM_ICV_LEN = 16
CHACHA20_KEY_BITS = 256  # RFC 7634 §2

# IntegId -> (hash constructor, key length, truncated ICV length); RFC 4868 §2.
_HMACS: dict[IntegId, tuple[Any, int, int]] = {
    IntegId.AUTH_HMAC_SHA1_96: (hashlib.sha1, 20, 12),  # RFC 2404 §2
    IntegId.AUTH_HMAC_SHA2_256_128: (hashlib.sha256, 32, 16),
    IntegId.AUTH_HMAC_SHA2_384_192: (hashlib.sha384, 48, 24),
    IntegId.AUTH_HMAC_SHA2_512_256: (hashlib.sha512, 64, 32),
}


class _Gcm:
    """ENCR_AES_GCM_16 (RFC 5282) or ENCR_CHACHA20_POLY1305 (RFC 7634 §3):
    body = IV || ciphertext || tag."""

    __slots__ = ("_aead", "_salt")
    iv_size = GCM_IV_LEN
    icv_size = GCM_ICV_LEN
    block = 1

    def __init__(self, key: bytes, salt: bytes, chacha: bool = False) -> None:
        self._aead: AESGCM | ChaCha20Poly1305 = ChaCha20Poly1305(key) if chacha \
            else AESGCM(key)
        self._salt = salt

    def seal(self, aad: bytes, plaintext: bytes, iv: bytes) -> bytes:
        return iv + self._aead.encrypt(self._salt + iv, plaintext, aad)

    def open(self, aad: bytes, body: memoryview) -> bytes:
        iv = bytes(body[:GCM_IV_LEN])
        try:
            return self._aead.decrypt(self._salt + iv, bytes(body[GCM_IV_LEN:]), aad)
        except InvalidTag:
            raise IntegrityError("SK payload authentication failed") from None


class _CbcHmac:
    """ENCR_AES_CBC + AUTH_HMAC_SHA2_*: body = IV || ciphertext || ICV, the ICV
    over everything from the IKE header to the end of the ciphertext."""

    __slots__ = ("_aes", "_mac", "icv_size")
    iv_size = AES_BLOCK_LEN
    block = AES_BLOCK_LEN

    def __init__(self, key: bytes, mac_key: bytes, digest: Any, icv_size: int) -> None:
        self._aes = algorithms.AES(key)
        self._mac = hmac.new(mac_key, digestmod=digest)
        self.icv_size = icv_size

    def _icv(self, *parts: bytes | memoryview) -> bytes:
        mac = self._mac.copy()
        for part in parts:
            mac.update(part)
        return mac.digest()[:self.icv_size]

    def seal(self, aad: bytes, plaintext: bytes, iv: bytes) -> bytes:
        # A Cipher per message: the IV is part of the CBC mode object.
        enc = Cipher(self._aes, modes.CBC(iv)).encryptor()
        ciphertext = enc.update(plaintext) + enc.finalize()
        return iv + ciphertext + self._icv(aad, iv, ciphertext)

    def open(self, aad: bytes, body: memoryview) -> bytes:
        icv = self._icv(aad, body[:-self.icv_size])
        if not hmac.compare_digest(icv, body[-self.icv_size:]):
            raise IntegrityError("SK payload authentication failed")
        dec = Cipher(self._aes, modes.CBC(bytes(body[:AES_BLOCK_LEN]))).decryptor()
        return dec.update(body[AES_BLOCK_LEN:-self.icv_size]) + dec.finalize()


@dataclass(slots=True)
class SkCipher:
    """Seals and opens SK payload bodies for one direction of an IKE SA.

    ``ValueError`` for an unsupported algorithm or a key of the wrong size."""

    encr: EncrId
    key_bits: int
    integ: IntegId
    sk_e: bytes = field(repr=False)
    sk_a: bytes = field(repr=False)
    _impl: _Gcm | _CbcHmac = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        chacha = self.encr == EncrId.ENCR_CHACHA20_POLY1305
        if chacha and self.key_bits != CHACHA20_KEY_BITS:
            raise ValueError(f"ChaCha20-Poly1305 has a {CHACHA20_KEY_BITS}-bit key")
        if not chacha and self.key_bits not in AES_KEY_BITS:
            raise ValueError(f"unsupported AES key size {self.key_bits} bits")
        key_len = self.key_bits // 8
        if self.encr == EncrId.ENCR_AES_GCM_16 or chacha:
            name = "ChaCha20-Poly1305" if chacha else f"AES-GCM-{self.key_bits}"
            if self.integ != IntegId.NONE or self.sk_a:
                raise ValueError(f"{name} takes no integrity algorithm and no SK_a")
            if len(self.sk_e) != key_len + GCM_SALT_LEN:
                raise ValueError(f"{name} needs SK_e of "
                                 f"{key_len + GCM_SALT_LEN} bytes (key || salt)")
            self._impl = _Gcm(self.sk_e[:key_len], self.sk_e[key_len:], chacha)
        elif self.encr == EncrId.ENCR_AES_CBC:
            spec = _HMACS.get(self.integ)
            if spec is None:
                raise ValueError(f"unsupported integrity algorithm {self.integ!r} for AES-CBC")
            digest, mac_key_len, icv_len = spec
            if len(self.sk_e) != key_len:
                raise ValueError(f"AES-CBC-{self.key_bits} needs SK_e of {key_len} bytes")
            if len(self.sk_a) != mac_key_len:
                raise ValueError(f"{self.integ.name} needs SK_a of {mac_key_len} bytes")
            self._impl = _CbcHmac(self.sk_e, self.sk_a, digest, icv_len)
        else:
            raise ValueError(f"unsupported SK encryption algorithm {self.encr!r}")

    @property
    def iv_size(self) -> int:
        return self._impl.iv_size

    @property
    def icv_size(self) -> int:
        return self._impl.icv_size

    def _padded_len(self, inner_len: int) -> int:
        # RFC 7296 §3.14: payloads || Padding || Pad Length, a whole number of
        # blocks (block size 1 for GCM: no padding, only the Pad Length octet).
        n = inner_len + 1
        return n + (-n % self._impl.block)

    def sealed_size(self, inner_len: int) -> int:
        """Bytes of IV || ciphertext || ICV for ``inner_len`` bytes of payloads."""
        return self._impl.iv_size + self._padded_len(inner_len) + self._impl.icv_size

    def seal(self, aad: bytes | bytearray | memoryview, inner: bytes | bytearray | memoryview,
             iv: bytes) -> bytes:
        """Encrypt and authenticate ``inner``; returns IV || ciphertext || ICV.

        ``aad`` is every byte of the message before the IV, its length fields
        already counting ``sealed_size(len(inner))`` bytes of SK body."""
        if len(iv) != self._impl.iv_size:
            raise ValueError(f"IV must be {self._impl.iv_size} bytes, got {len(iv)}")
        pad = self._padded_len(len(inner)) - len(inner) - 1
        # Padding content is ours to choose (RFC 7296 §3.14); zeros need no RNG.
        plaintext = bytes(inner) + bytes(pad) + bytes([pad])
        return self._impl.seal(bytes(aad), plaintext, bytes(iv))

    def open(self, aad: bytes | bytearray | memoryview,
             body: bytes | bytearray | memoryview) -> bytes:
        """Check and decrypt IV || ciphertext || ICV; returns the payload bytes
        with Padding and Pad Length removed."""
        view = memoryview(body)
        impl = self._impl
        ct_len = len(view) - impl.iv_size - impl.icv_size
        if ct_len < 1 or ct_len % impl.block:
            raise MalformedMessage(f"SK payload body of {len(view)} bytes has a bad size")
        plaintext = impl.open(bytes(aad), view)
        # RFC 7296 §3.14: the receiver must not check the padding's content.
        pad = plaintext[-1]
        if pad >= len(plaintext):
            raise MalformedMessage(f"Pad Length {pad} exceeds the plaintext")
        return plaintext[:len(plaintext) - 1 - pad]
