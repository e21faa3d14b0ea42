"""SK payload protection (RFC 7296 §3.14, RFC 5282, RFC 4868), one direction."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from common.errors import IntegrityError, MalformedMessage
from common.ike.constants import EncrId, IntegId
from common.ike.sk import SkCipher

GCM, CBC = EncrId.ENCR_AES_GCM_16, EncrId.ENCR_AES_CBC
SHA256, SHA384, SHA512 = (IntegId.AUTH_HMAC_SHA2_256_128, IntegId.AUTH_HMAC_SHA2_384_192,
                          IntegId.AUTH_HMAC_SHA2_512_256)

# (encr, key bits, integ, SK_e length, SK_a length)
SUITES = [
    (GCM, 128, IntegId.NONE, 20, 0),
    (GCM, 256, IntegId.NONE, 36, 0),
    (CBC, 128, SHA256, 16, 32),
    (CBC, 256, SHA256, 32, 32),
    (CBC, 256, SHA384, 32, 48),
    (CBC, 256, SHA512, 32, 64),
    (CBC, 128, IntegId.AUTH_HMAC_SHA1_96, 16, 20),
    (EncrId.ENCR_CHACHA20_POLY1305, 256, IntegId.NONE, 36, 0),
]
SUITE_IDS = [f"{e.name}-{b}-{i.name}" for e, b, i, _, _ in SUITES]


def make_cipher(suite: tuple[EncrId, int, IntegId, int, int], seed: int = 1) -> SkCipher:
    encr, bits, integ, e_len, a_len = suite
    return SkCipher(encr, bits, integ, bytes((seed + i) % 256 for i in range(e_len)),
                    bytes((seed * 7 + i) % 256 for i in range(a_len)))


def all_ciphers(seed: int = 1) -> list[SkCipher]:
    return [make_cipher(s, seed) for s in SUITES]


AAD = bytes(range(32))


@pytest.mark.parametrize("suite", SUITES, ids=SUITE_IDS)
def test_seal_open_round_trip_and_sizes(suite: tuple[EncrId, int, IntegId, int, int]) -> None:
    sk = make_cipher(suite)
    for n in range(0, 50):
        inner = bytes(range(n))
        body = sk.seal(AAD, inner, bytes(sk.iv_size))
        assert len(body) == sk.sealed_size(n)
        assert sk.open(AAD, body) == inner


def test_sizes() -> None:
    gcm, _, cbc256, _, cbc384, cbc512, sha1, chacha = all_ciphers()
    assert (gcm.iv_size, gcm.icv_size, gcm.sealed_size(10)) == (8, 16, 8 + 11 + 16)
    assert (cbc256.iv_size, cbc256.icv_size, cbc256.sealed_size(15)) == (16, 16, 16 + 16 + 16)
    assert cbc256.sealed_size(16) == 16 + 32 + 16
    assert (cbc384.icv_size, cbc512.icv_size) == (24, 32)
    assert (sha1.iv_size, sha1.icv_size) == (16, 12)             # RFC 2404 §2
    assert (chacha.iv_size, chacha.icv_size, chacha.sealed_size(10)) == (8, 16, 8 + 11 + 16)


def test_gcm_known_answer_rfc5282() -> None:
    """RFC 5282 §3-§5, computed independently with the bare AESGCM call."""
    key, salt = bytes.fromhex("000102030405060708090a0b0c0d0e0f"), bytes.fromhex("a0a1a2a3")
    sk = SkCipher(GCM, 128, IntegId.NONE, key + salt, b"")
    iv = bytes.fromhex("0001020304050607")
    inner = b"payload bytes"
    # Plaintext: payloads || Pad Length 0 (block size 1, RFC 5282 §5).
    expected = iv + AESGCM(key).encrypt(salt + iv, inner + b"\x00", AAD)
    assert sk.seal(AAD, inner, iv) == expected
    assert sk.open(AAD, expected) == inner


def test_cbc_hmac_known_answer_rfc7296_3_14() -> None:
    key, mac_key = bytes(range(16)), bytes(range(100, 132))
    sk = SkCipher(CBC, 128, SHA256, key, mac_key)
    iv = bytes(range(16, 32))
    inner = bytes(range(20))
    plaintext = inner + bytes(11) + b"\x0b"  # 20 + 11 + 1 = 32, two blocks
    enc = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    ct = enc.update(plaintext) + enc.finalize()
    icv = hmac.new(mac_key, AAD + iv + ct, hashlib.sha256).digest()[:16]
    assert sk.seal(AAD, inner, iv) == iv + ct + icv


def test_cbc_padding_content_is_not_checked() -> None:
    """RFC 7296 §3.14: the receiver must accept any padding content."""
    key, mac_key = bytes(range(16)), bytes(range(32))
    sk = SkCipher(CBC, 128, SHA256, key, mac_key)
    iv = bytes(16)
    plaintext = b"hello" + b"\xaa" * 26 + bytes([26])
    enc = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    ct = enc.update(plaintext) + enc.finalize()
    icv = hmac.new(mac_key, AAD + iv + ct, hashlib.sha256).digest()[:16]
    assert sk.open(AAD, iv + ct + icv) == b"hello"


@pytest.mark.parametrize("pad", [16, 32, 255])
def test_authenticated_bad_pad_length_is_malformed(pad: int) -> None:
    key, salt = bytes(16), bytes(4)
    sk = SkCipher(GCM, 128, IntegId.NONE, key + salt, b"")
    iv = bytes(8)
    body = iv + AESGCM(key).encrypt(salt + iv, bytes(15) + bytes([pad]), AAD)
    with pytest.raises(MalformedMessage):
        sk.open(AAD, body)


@pytest.mark.parametrize("suite", SUITES, ids=SUITE_IDS)
def test_every_flipped_bit_fails_integrity(suite: tuple[EncrId, int, IntegId, int, int]) -> None:
    sk = make_cipher(suite)
    body = sk.seal(AAD, b"x" * 40, bytes(range(sk.iv_size)))
    for i in range(len(body)):
        for mask in (0x01, 0x80):
            bad = bytearray(body)
            bad[i] ^= mask
            with pytest.raises(IntegrityError):
                sk.open(AAD, bytes(bad))
    for i in range(len(AAD)):
        bad_aad = bytearray(AAD)
        bad_aad[i] ^= 0x01
        with pytest.raises(IntegrityError):
            sk.open(bytes(bad_aad), body)


@pytest.mark.parametrize("suite", SUITES, ids=SUITE_IDS)
def test_wrong_key_fails_integrity(suite: tuple[EncrId, int, IntegId, int, int]) -> None:
    body = make_cipher(suite, seed=1).seal(AAD, b"secret", bytes(make_cipher(suite).iv_size))
    with pytest.raises(IntegrityError):
        make_cipher(suite, seed=2).open(AAD, body)


@pytest.mark.parametrize("suite", SUITES, ids=SUITE_IDS)
def test_every_truncation_fails_cleanly(suite: tuple[EncrId, int, IntegId, int, int]) -> None:
    sk = make_cipher(suite)
    body = sk.seal(AAD, b"y" * 33, bytes(sk.iv_size))
    for n in range(len(body)):
        with pytest.raises((MalformedMessage, IntegrityError)):
            sk.open(AAD, body[:n])


@pytest.mark.parametrize("args", [
    (GCM, 128, IntegId.NONE, bytes(16), b""),  # salt missing
    (GCM, 256, IntegId.NONE, bytes(20), b""),
    (GCM, 128, SHA256, bytes(20), bytes(32)),  # AEAD takes no integrity
    (GCM, 100, IntegId.NONE, bytes(16), b""),
    (CBC, 128, IntegId.NONE, bytes(16), b""),
    (CBC, 128, IntegId.AUTH_HMAC_SHA1_96, bytes(16), bytes(32)),  # SHA-1 key: 20
    (CBC, 128, IntegId(1), bytes(16), bytes(16)),  # HMAC-MD5-96
    (CBC, 128, SHA256, bytes(32), bytes(32)),
    (CBC, 256, SHA256, bytes(32), bytes(16)),
    (EncrId.ENCR_AES_CTR, 128, SHA256, bytes(20), bytes(32)),
    (EncrId.ENCR_CHACHA20_POLY1305, 256, IntegId.NONE, bytes(32), b""),  # salt missing
    (EncrId.ENCR_CHACHA20_POLY1305, 128, IntegId.NONE, bytes(20), b""),
    (EncrId.ENCR_CHACHA20_POLY1305, 256, SHA256, bytes(36), bytes(32)),
], ids=repr)
def test_bad_configuration_is_a_value_error(args: tuple[EncrId, int, IntegId, bytes, bytes]
                                            ) -> None:
    with pytest.raises(ValueError):
        SkCipher(*args)


def test_wrong_iv_size_is_a_value_error() -> None:
    for sk in all_ciphers():
        with pytest.raises(ValueError):
            sk.seal(AAD, b"", bytes(sk.iv_size + 1))


def test_repr_hides_keys() -> None:
    sk = SkCipher(CBC, 128, SHA256, b"\x11" * 16, b"\x22" * 32)
    text = repr(sk)
    assert "ENCR_AES_CBC" in text
    assert "11" * 4 not in text and "x11" not in text and "x22" not in text
    assert "sk_e" not in text and "sk_a" not in text
