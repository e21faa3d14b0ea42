"""SK payload with ChaCha20-Poly1305 (RFC 7634 §3) and AES-CBC + HMAC-SHA1-96
(RFC 2404): known answers from independent implementations.  Round trips,
flipped bits and truncations run for these suites in tests/test_ike_sk.py."""

from __future__ import annotations

import hmac

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from common.ike.constants import EncrId, IntegId
from common.ike.sk import SkCipher

CHACHA = EncrId.ENCR_CHACHA20_POLY1305


def test_chacha20poly1305_sk_layout_rfc7634_section3() -> None:
    # RFC 7634 §3 (as RFC 5282 §3-§5 for GCM): nonce = 4-byte salt (the end of
    # SK_e) | 8-byte IV; AAD = everything before the IV; the plaintext is the
    # payloads, then Pad Length (no padding: block size 1).
    key, salt, iv = bytes(range(32)), b"\xa0\xa1\xa2\xa3", b"\x10" * 8
    aad, inner = b"IKE header and SK header bytes..", b"payloads"
    sk = SkCipher(CHACHA, 256, IntegId.NONE, key + salt, b"")
    body = sk.seal(aad, inner, iv)
    assert body == iv + ChaCha20Poly1305(key).encrypt(salt + iv, inner + b"\x00", aad)
    assert len(body) == sk.sealed_size(len(inner)) == 8 + len(inner) + 1 + 16
    assert sk.open(aad, body) == inner


def test_cbc_hmac_sha1_96_sk_layout() -> None:
    key, mac_key, iv = bytes(range(16)), bytes(range(100, 120)), bytes(range(16, 32))
    aad, inner = b"header", b"x" * 20
    sk = SkCipher(EncrId.ENCR_AES_CBC, 128, IntegId.AUTH_HMAC_SHA1_96, key, mac_key)
    body = sk.seal(aad, inner, iv)
    plaintext = inner + bytes(11) + b"\x0b"   # 32 bytes: padding to the block, Pad Length
    enc = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    ciphertext = enc.update(plaintext) + enc.finalize()
    icv = hmac.digest(mac_key, aad + iv + ciphertext, "sha1")[:12]   # RFC 2404 §2
    assert body == iv + ciphertext + icv
    assert sk.open(aad, body) == inner
