"""ESP ChaCha20-Poly1305 (RFC 7634) and AES-CBC + HMAC (RFC 3602, RFC 2404,
RFC 4868): known answers, the keymat layouts, and the CBC IV design.

Round trips, every altered bit, truncations, replay, ESN and the compiled
path against the pure one run for every transform in tests/test_esp.py and
tests/test_esp_fast.py; scapy decrypts them in tests/test_esp_scapy_oracle.py.
Every test here runs against both ESP paths too.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import struct

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from common.errors import IntegrityError, MalformedMessage
from common.esp.transforms import TRANSFORMS, CbcHmac, Hmac, InboundSA, OutboundSA
from tests.esp_impls import IMPLS, use_impl

SPI = 0x0D0D_0001
h = bytes.fromhex
CBC_ALL = sorted(t for t in TRANSFORMS if TRANSFORMS[t].cipher == "cbc")


@pytest.fixture(autouse=True, params=IMPLS)
def esp_impl(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    use_impl(request.param, monkeypatch)
    return str(request.param)


def ipv4(n: int = 40) -> bytes:
    return bytes([0x45]) + bytes(19) + os.urandom(n)


# --- ChaCha20-Poly1305 --------------------------------------------------------

# RFC 8439 §2.8.2 (the AEAD that RFC 7634 §2 uses): its 12-byte nonce is
# 07000000 | 4041424344454647 and its 12-byte AAD 50515253 | c0c1c2c3 | c4c5c6c7,
# which is exactly an ESP packet with salt 07000000, IV 4041424344454647, SPI
# 0x50515253 and the 64-bit (ESN) sequence number 0xc0c1c2c3c4c5c6c7
# (RFC 7634 §2, §4: nonce = salt | IV, AAD as RFC 4106 §5).
CHACHA_KEY = bytes(range(0x80, 0xA0))
CHACHA_SALT = h("07000000")
CHACHA_PLAIN = (b"Ladies and Gentlemen of the class of '99: If I could offer you only one "
                b"tip for the future, sunscreen would be it.")
CHACHA_CIPHER = h(
    "d31a8d34648e60db7b86afbc53ef7ec2a4aded51296e08fea9e2b5a736ee62d6"
    "3dbea45e8ca9671282fafb69da92728b1a71de0a9e060b2905d6a5b67ecd3b36"
    "92ddbd7f2d778b8c9803aee328091b58fab324e4fad675945585808b4831d7bc"
    "3ff4def08e4b7a9de576d26586cec64b6116")
CHACHA_TAG = h("1ae10b594f09e26a7e902ecbd0600691")
CHACHA_SEQ = 0xC0C1C2C3C4C5C6C7


def test_chacha20poly1305_rfc8439_vector_as_esp_outbound() -> None:
    # The plaintext starts with "L" (0x4c): the SA takes it for IPv4.  The
    # keystream part of the ciphertext is the RFC's (the trailer then differs,
    # so does the tag).
    out = OutboundSA(0x5051_5253, "chacha20poly1305", CHACHA_KEY + CHACHA_SALT,
                     sender_id=0x4041, esn=True, initial_seq=CHACHA_SEQ,
                     initial_iv_counter=0x4243_4445_4647)
    esp = out.protect(CHACHA_PLAIN)
    assert esp[:16] == h("50515253c4c5c6c74041424344454647")
    assert esp[16:16 + len(CHACHA_PLAIN)] == CHACHA_CIPHER


def test_chacha20poly1305_rfc8439_vector_as_esp_inbound() -> None:
    packet = h("50515253c4c5c6c74041424344454647") + CHACHA_CIPHER + CHACHA_TAG
    inb = InboundSA(0x5051_5253, "chacha20poly1305", CHACHA_KEY + CHACHA_SALT, esn=True)
    inb.window.record(CHACHA_SEQ - 1)   # the receiver is in the same 2^32 subspace
    forged = bytearray(packet)
    forged[-1] ^= 1
    with pytest.raises(IntegrityError):
        inb.unprotect(bytes(forged))
    assert inb.window.highest == CHACHA_SEQ - 1
    # The tag verifies (the number is recorded); the RFC's text is no ESP
    # trailer, so the authentic packet is then refused as malformed.
    with pytest.raises(MalformedMessage):
        inb.unprotect(packet)
    assert inb.window.highest == CHACHA_SEQ


# --- AES-CBC ------------------------------------------------------------------

# RFC 3602 §4, cases #1-#4 (key, IV, plaintext, ciphertext).
RFC3602_VECTORS = [
    ("06a9214036b8a15b512e03d534120006", "3dafba429d9eb430b422da802c9fac41",
     b"Single block msg".hex(), "e353779c1079aeb82708942dbe77181a"),
    ("c286696d887c9aa0611bbb3e2025a45a", "562e17996d093d28ddb3ba695a2e6f58",
     bytes(range(32)).hex(),
     "d296cd94c2cccf8a3a863028b5e1dc0a7586602d253cfff91b8266bea6d61ab1"),
    ("6c3ea0477630ce21a2ce334aa746c2cd", "c782dc4c098c66cbd9cd27d825682c81",
     b"This is a 48-byte message (exactly 3 AES blocks)".hex(),
     "d0a02b3836451753d493665d33f0e886"
     "2dea54cdb293abc7506939276772f8d5"
     "021c19216bad525c8579695d83ba2684"),
    ("56e47a38c5598974bc46903dba290349", "8ce82eefbea0da3c44699ed7db51b7d9",
     bytes(range(0xA0, 0xE0)).hex(),
     "c30e32ffedc0774e6aff6af0869f71aa"
     "0f3af07a9a31a9c684db207eb0ef8e4e"
     "35907aa632c3ffdf868bb7b29d3d46ad"
     "83ce9f9a102ee99d49a53e87f4c3da55"),
]


@pytest.mark.parametrize(("key", "iv", "plain", "cipher"), RFC3602_VECTORS)
def test_rfc3602_section4_vectors_decrypt(key: str, iv: str, plain: str, cipher: str) -> None:
    integ = os.urandom(32)
    suite = CbcHmac(h(key), integ, "sha256")
    body = struct.pack("!II", SPI, 1) + h(iv) + h(cipher)
    packet = body + hmac.digest(integ, body, "sha256")[:16]
    assert suite.open(memoryview(packet), None) == h(plain)


@pytest.mark.parametrize(("key", "iv", "plain", "cipher"), RFC3602_VECTORS)
def test_rfc3602_vectors_through_the_sa_authenticate(key: str, iv: str, plain: str,
                                                     cipher: str) -> None:
    # The RFC's plaintexts are no ESP payloads: an SA (either path) takes the
    # packet as authentic, records it, then refuses the trailer.
    integ = os.urandom(32)
    body = struct.pack("!II", SPI, 1) + h(iv) + h(cipher)
    packet = body + hmac.digest(integ, body, "sha256")[:16]
    inb = InboundSA(SPI, "aes128cbc-sha256", h(key) + integ)
    with pytest.raises(MalformedMessage):
        inb.unprotect(packet)
    assert inb.window.highest == 1


# RFC 2404 §5: HMAC-SHA-1-96 test cases 1-3 (key, data, 96-bit ICV).
RFC2404_VECTORS = [
    (b"\x0b" * 20, b"Hi There", "b617318655057264e28bc0b6"),
    (b"Jefe", b"what do ya want for nothing?", "effcdf6ae5eb2fa2d27416d5"),
    (b"\xaa" * 20, b"\xdd" * 50, "125d7342b9ac11cd91a39af4"),
]


@pytest.mark.parametrize(("key", "data", "icv"), RFC2404_VECTORS)
def test_rfc2404_hmac_sha1_96_vectors(key: bytes, data: bytes, icv: str) -> None:
    assert Hmac(key, "sha1").icv(data, None) == h(icv)


@pytest.mark.parametrize(("digest", "size"), [("sha1", 12), ("sha256", 16),
                                              ("sha384", 24), ("sha512", 32)])
def test_hmac_truncation_lengths(digest: str, size: int) -> None:
    # RFC 2404 §2 (96 bits), RFC 4868 §2.1 (half the hash output).
    key = os.urandom(hashlib.new(digest).digest_size)
    data = os.urandom(100)
    assert Hmac(key, digest).icv(data, None) == hmac.digest(key, data, digest)[:size]
    assert Hmac(key, digest).icv(data, b"\x00\x00\x00\x07") == \
        hmac.digest(key, data + b"\x00\x00\x00\x07", digest)[:size]


def _ecb(key: bytes, block: bytes) -> bytes:
    enc = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    return enc.update(block) + enc.finalize()


@pytest.mark.parametrize("transform", CBC_ALL)
def test_cbc_layout_and_iv_is_the_encrypted_sender_counter(transform: str) -> None:
    t = TRANSFORMS[transform]
    km = os.urandom(t.keymat_size)
    key, integ = km[:t.key_size], km[t.key_size:]
    out = OutboundSA(SPI, transform, km, sender_id=0x0A0B, initial_iv_counter=77)
    for n in (0, 13, 14, 15, 16, 100):
        inner = ipv4(n)
        counter = out.next_iv_counter
        esp = out.protect(inner)
        iv = esp[8:24]
        # SP 800-38A Appendix C: IV = E_K(nonce); the nonce never shows.
        assert iv == _ecb(key, b"ESP-CBC\x00" + struct.pack("!HHI", 0x0A0B,
                                                               counter >> 32, counter & 0xFFFFFFFF))
        assert struct.pack("!Q", 0x0A0B << 48 | counter) not in esp
        body, icv = esp[:-t.icv_size], esp[-t.icv_size:]
        assert icv == hmac.digest(integ, body, t.integ or "")[:t.icv_size]
        dec = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
        plain = dec.update(body[24:]) + dec.finalize()
        pad = (-(len(inner) + 2)) % 16
        assert plain == inner + bytes(range(1, pad + 1)) + bytes([pad, 4])


def test_cbc_ivs_differ_across_packets_and_members() -> None:
    km = os.urandom(TRANSFORMS["aes256cbc-sha256"].keymat_size)
    ivs = set()
    for sender in (1, 2, 3):
        out = OutboundSA(SPI, "aes256cbc-sha256", km, sender_id=sender)
        ivs |= {out.protect(ipv4(8))[8:24] for _ in range(200)}
    assert len(ivs) == 600


def test_cbc_takeover_member_continues_with_fresh_ivs() -> None:
    # A member taking an SA over derives the IV key from the keymat: no new
    # state to replicate, and its own sender id keeps its IVs apart.
    km = os.urandom(TRANSFORMS["aes128cbc-sha1"].keymat_size)
    first = OutboundSA(SPI, "aes128cbc-sha1", km, sender_id=1)
    before = {first.protect(ipv4(1))[8:24] for _ in range(50)}
    second = OutboundSA(SPI, "aes128cbc-sha1", km, sender_id=2,
                        initial_seq=first.next_seq, initial_iv_counter=1)
    inb = InboundSA(SPI, "aes128cbc-sha1", km)
    inner = ipv4(1)
    packet = second.protect(inner)
    assert packet[8:24] not in before
    assert inb.unprotect(packet) == inner


@pytest.mark.parametrize(("transform", "size", "layout"), [
    ("chacha20poly1305", 36, "32 key + 4 salt"),
    ("aes128cbc-sha1", 36, "16 key + 20 integrity"),
    ("aes128cbc-sha256", 48, "16 key + 32 integrity"),
    ("aes256cbc-sha384", 80, "32 key + 48 integrity"),
    ("aes256cbc-sha512", 96, "32 key + 64 integrity"),
])
def test_keymat_layouts(transform: str, size: int, layout: str) -> None:
    # RFC 7296 §2.17 with RFC 7634 §4 (key + 4-byte salt) and RFC 3602 (no salt).
    assert TRANSFORMS[transform].keymat_size == size
    with pytest.raises(ValueError, match=re.escape(f"needs keymat of {size} bytes ({layout})")):
        OutboundSA(SPI, transform, bytes(size - 1), sender_id=1)
    OutboundSA(SPI, transform, bytes(size), sender_id=1)


@pytest.mark.parametrize("transform", CBC_ALL)
def test_cbc_ciphertext_not_whole_blocks_is_malformed_before_the_window(
        transform: str) -> None:
    km = os.urandom(TRANSFORMS[transform].keymat_size)
    out = OutboundSA(SPI, transform, km, sender_id=1)
    inb = InboundSA(SPI, transform, km)
    esp = out.protect(ipv4(30))
    for cut in (1, 8, 15):
        with pytest.raises(MalformedMessage, match="whole number of blocks"):
            inb.unprotect(esp[:-cut])
    assert inb.window.highest == 0
    assert inb.unprotect(esp)[:1] == b"\x45"
