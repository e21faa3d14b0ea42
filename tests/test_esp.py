"""ESP transform: known answers, round trips, tampering, replay, limits, errors.

Every test runs twice: against the compiled byte primitive (``common.esp._esp_fast``,
the default when built) and against the pure-Python reference path.
"""

from __future__ import annotations

import os
import re
import struct

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from common import errors
from common.esp.transforms import (
    IV_BLOCK,
    TRANSFORMS,
    AesCtr,
    CbcHmac,
    CtrHmac,
    Hmac,
    InboundSA,
    IntegrityError,
    MalformedMessage,
    OutboundSA,
    RekeyRequested,
    ReplayError,
    SequenceExhausted,
)
from tests.esp_impls import IMPLS, use_impl

SPI = 0x1234_5678


@pytest.fixture(autouse=True, params=IMPLS)
def esp_impl(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test here runs against the compiled and the pure-Python ESP path."""
    use_impl(request.param, monkeypatch)
    return str(request.param)
h = bytes.fromhex


def ipv4(payload_len: int = 40) -> bytes:
    total = 20 + payload_len
    return (bytes([0x45, 0, total >> 8, total & 0xFF]) + bytes(4) + bytes([64, 17, 0, 0])
            + bytes([10, 0, 0, 1, 10, 0, 0, 2]) + bytes(i & 0xFF for i in range(payload_len)))


def ipv6(payload_len: int = 40) -> bytes:
    return (bytes([0x60, 0, 0, 0, payload_len >> 8, payload_len & 0xFF, 17, 64])
            + bytes(15) + b"\x01" + bytes(15) + b"\x02" + os.urandom(payload_len))


def keymat(transform: str) -> bytes:
    return os.urandom(TRANSFORMS[transform].keymat_size)


def pair(transform: str, esn: bool = False, **out_kw: int
         ) -> tuple[OutboundSA, InboundSA]:
    km = keymat(transform)
    return (OutboundSA(SPI, transform, km, sender_id=7, esn=esn, **out_kw),
            InboundSA(SPI, transform, km, replay_window=1024, esn=esn))


ALL = sorted(TRANSFORMS)

# --- Known answers --------------------------------------------------------

# RFC 3686 §6, test vectors #1-#3 (128-bit key) and #7-#9 (256-bit key):
# (key, IV, nonce, plaintext, ciphertext).
RFC3686_VECTORS = [
    ("AE6852F8121067CC4BF7A5765577F39E", "0000000000000000", "00000030",
     b"Single block msg".hex(), "E4095D4FB7A7B3792D6175A3261311B8"),
    ("7E24067817FAE0D743D6CE1F32539163", "C0543B59DA48D90B", "006CB6DB",
     bytes(range(32)).hex(),
     "5104A106168A72D9790D41EE8EDAD388EB2E1EFC46DA57C8FCE630DF9141BE28"),
    ("7691BE035E5020A8AC6E618529F9A0DC", "27777F3F4A1786F0", "00E0017B",
     bytes(range(36)).hex(),
     "C1CF48A89F2FFDD9CF4652E9EFDB72D74540A42BDE6D7836D59A5CEAAEF3105325B2072F"),
    ("776BEFF2851DB06F4C8A0542C8696F6C6A81AF1EEC96B4D37FC1D689E6C1C104",
     "DB5672C97AA8F0B2", "00000060",
     b"Single block msg".hex(), "145AD01DBF824EC7560863DC71E3E0C0"),
    ("F6D66D6BD52D59BB0796365879EFF886C66DD51A5B6A99744B50590C87A23884",
     "C1585EF15A43D875", "00FAAC24", bytes(range(32)).hex(),
     "F05E231B3894612C49EE000B804EB2A9B8306B508F839D6A5530831D9344AF1C"),
    ("FF7A617CE69148E4F1726E2F43581DE2AA62D9F805532EDFF1EED687FB54153D",
     "51A51D70A1C11148", "001CC5B7", bytes(range(36)).hex(),
     "EB6C52821D0BBBF7CE7594462ACA4FAAB407DF866569FD07F48CC0B583D6071F1EC0E6B8"),
]


@pytest.mark.parametrize(("key", "iv", "nonce", "plain", "cipher"), RFC3686_VECTORS)
def test_rfc3686_section6_vectors(key: str, iv: str, nonce: str, plain: str,
                                  cipher: str) -> None:
    ctr = AesCtr(h(key), h(nonce))
    assert ctr.crypt(h(iv), h(plain)) == h(cipher)
    assert ctr.crypt(h(iv), h(cipher)) == h(plain)


@pytest.mark.parametrize("key_size", [16, 32])
def test_ctr_keystream_matches_openssl_ctr_for_every_length(key_size: int) -> None:
    # Both routes of AesCtr.crypt (short: one ECB call; long: GCM from block 2)
    # against OpenSSL's own AES-CTR with counter block nonce|IV|00000001.
    key, nonce, iv = os.urandom(key_size), os.urandom(4), os.urandom(8)
    ctr = AesCtr(key, nonce)
    for n in [*range(0, 300), 1404, 1500]:
        data = os.urandom(n)
        ref = Cipher(algorithms.AES(key), modes.CTR(nonce + iv + b"\0\0\0\1")).encryptor()
        assert ctr.crypt(iv, data) == ref.update(data), n


# RFC 4868 §2.7.2.1: HMAC-SHA-256 with 32-byte keys, truncated to 128 bits.
RFC4868_VECTORS = [
    (b"\x0b" * 32, b"Hi There", "198a607eb44bfbc69903a0f1cf2bbdc5"),
    (b"Jefe" * 8, b"what do ya want for nothing?", "167f928588c5cc2eef8e3093caa0e87c"),
    (b"\xaa" * 32, b"\xdd" * 50, "cdcb1220d1ecccea91e53aba3092f962"),
    (bytes(range(1, 33)), b"\xcd" * 50, "372efcf9b40b35c2115b1346903d2ef4"),
]


@pytest.mark.parametrize(("key", "data", "icv"), RFC4868_VECTORS)
def test_rfc4868_hmac_sha256_128_vectors(key: bytes, data: bytes, icv: str) -> None:
    suite = Hmac(key, "sha256")
    assert suite.icv(data, None) == h(icv)
    assert suite.icv(memoryview(data), None) == h(icv)


# The GCM specification (McGrew & Viega, "The Galois/Counter Mode of Operation")
# test cases 1-4 (AES-128) and 13-15 (AES-256); 96-bit IVs as RFC 4106 uses.
GCM_K = "feffe9928665731c6d6a8f9467308308"
GCM_P = ("d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72"
         "1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b391aafd255")
GCM_IV = "cafebabefacedbaddecaf888"
GCM_A = "feedfacedeadbeeffeedfacedeadbeefabaddad2"
GCM_C3 = ("42831ec2217774244b7221b784d0d49ce3aa212f2c02a4e035c17e2329aca12e"
          "21d514b25466931c7d8f6a5aac84aa051ba30b396a0aac973d58e091473f5985")
GCM_C15 = ("522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa"
           "8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662898015ad")
GCM_VECTORS = [  # (name, key, iv, plaintext, aad, ciphertext, tag)
    ("TC1", "00" * 16, "00" * 12, "", "", "", "58e2fccefa7e3061367f1d57a4e7455a"),
    ("TC2", "00" * 16, "00" * 12, "00" * 16, "", "0388dace60b6a392f328c2b971b2fe78",
     "ab6e47d42cec13bdf53a67b21257bddf"),
    ("TC3", GCM_K, GCM_IV, GCM_P, "", GCM_C3, "4d5c2af327cd64a62cf35abd2ba6fab4"),
    ("TC4", GCM_K, GCM_IV, GCM_P[:120], GCM_A, GCM_C3[:120],
     "5bc94fbc3221a5db94fae95ae7121a47"),
    ("TC13", "00" * 32, "00" * 12, "", "", "", "530f8afbc74536b9a963b4f1c4cb738b"),
    ("TC14", "00" * 32, "00" * 12, "00" * 16, "", "cea7403d4d606b6e074ec5d3baf39d18",
     "d0d1c8a799996bf0265b98b5d48ab919"),
    ("TC15", GCM_K * 2, GCM_IV, GCM_P, "", GCM_C15, "b094dac5d93471bdec1a502270e3cc6c"),
]


@pytest.mark.parametrize(("name", "key", "iv", "plain", "aad", "cipher", "tag"), GCM_VECTORS)
def test_gcm_spec_vectors(name: str, key: str, iv: str, plain: str, aad: str, cipher: str,
                          tag: str) -> None:
    aead = AESGCM(h(key))
    assert aead.encrypt(h(iv), h(plain), h(aad) or None) == h(cipher + tag), name
    assert aead.decrypt(h(iv), h(cipher + tag), h(aad) or None) == h(plain), name


@pytest.mark.parametrize(("transform", "key"), [("aes128gcm16", GCM_K),
                                                ("aes256gcm16", GCM_K * 2)])
def test_sa_gcm_nonce_is_salt_then_iv(transform: str, key: str) -> None:
    # RFC 4106 §4: nonce = salt (last 4 keymat bytes, §8.1) | 8-byte IV.  With
    # keymat = K | cafebabe and IV facedbaddecaf888 (sender id 0xface, counter
    # 0xdbaddecaf888) the SA must use the keystream of GCM test case 3/15.
    keystream = bytes(a ^ b for a, b in zip(h(GCM_P), h(GCM_C3 if len(key) == 32 else GCM_C15),
                                            strict=True))
    out = OutboundSA(SPI, transform, h(key) + h("cafebabe"), sender_id=0xFACE,
                     initial_iv_counter=0xDBADDECAF888)
    inner = ipv4(40)                     # 60 bytes + trailer 0 pad, 2 = 62 -> pad 2 = 64
    esp = out.protect(inner)
    assert esp[8:16] == h("facedbaddecaf888")
    plain = inner + b"\x01\x02\x02\x04"
    assert bytes(a ^ b for a, b in zip(esp[16:80], keystream, strict=True)) == plain
    # The tag covers AAD = SPI | seq (RFC 4106 §5).
    assert AESGCM(h(key)).decrypt(h(GCM_IV), esp[16:], esp[:8]) == plain


def test_sa_ctr_layout_matches_rfc3686_vector_2() -> None:
    key, iv, nonce, plain, cipher = RFC3686_VECTORS[1]
    keystream = bytes(a ^ b for a, b in zip(h(plain), h(cipher), strict=True))
    integ = os.urandom(32)
    out = OutboundSA(SPI, "aes128ctr-sha256", h(key) + h(nonce) + integ,
                     sender_id=0xC054, initial_iv_counter=0x3B59DA48D90B)
    inner = ipv4(40)
    esp = out.protect(inner)
    assert esp[8:16] == h(iv)
    assert bytes(a ^ b for a, b in zip(esp[16:48], keystream, strict=True)) == inner[:32]
    icv = Hmac(integ, "sha256").icv(esp[:-16], None)
    assert esp[-16:] == icv


# --- Round trips, layout ------------------------------------------------------

@pytest.mark.parametrize("transform", ALL)
@pytest.mark.parametrize("esn", [False, True])
@pytest.mark.parametrize("make", [ipv4, ipv6])
def test_round_trip(transform: str, esn: bool, make: object) -> None:
    out, inb = pair(transform, esn)
    t = TRANSFORMS[transform]
    overhead = 8 + t.iv_size + t.icv_size
    for n in [0, 1, 2, 3, 7, 60, 97, 98, 99, 100, 200, 1380]:
        inner = make(n)  # type: ignore[operator]
        esp = out.protect(inner)
        assert esp[:4] == SPI.to_bytes(4)
        # RFC 4303 §2.4: Pad Length and Next Header end on a 4-byte boundary,
        # and on the 16-byte AES block for CBC (RFC 3602 §3); minimal padding.
        assert (len(esp) - overhead) % t.align == 0
        assert len(esp) - overhead - len(inner) - 2 in range(t.align)
        assert inb.unprotect(esp) == inner
    assert out.packets == inb.packets == 12
    assert out.octets == inb.octets
    assert inb.window.highest == 12


def test_sequence_numbers_start_at_one_and_increase() -> None:
    out, _ = pair("aes128gcm16")
    seqs = [struct.unpack_from("!I", out.protect(ipv4()), 4)[0] for _ in range(5)]
    assert seqs == [1, 2, 3, 4, 5]
    assert out.next_seq == 6


def test_ivs_are_sender_id_and_counter_across_iv_blocks() -> None:
    out, _ = pair("aes128gcm16")
    ivs = [int.from_bytes(out.protect(ipv4(0))[8:16]) for _ in range(IV_BLOCK + 10)]
    assert ivs == [(7 << 48) | c for c in range(1, IV_BLOCK + 11)]
    assert out.next_iv_counter == IV_BLOCK + 11


def test_two_senders_never_share_an_iv_under_one_key() -> None:
    km = keymat("aes128gcm16")
    a = OutboundSA(SPI, "aes128gcm16", km, sender_id=1)
    b = OutboundSA(SPI, "aes128gcm16", km, sender_id=2)
    ivs_a = {a.protect(ipv4())[8:16] for _ in range(2000)}
    ivs_b = {b.protect(ipv4())[8:16] for _ in range(2000)}
    assert len(ivs_a) == len(ivs_b) == 2000 and not ivs_a & ivs_b


def test_takeover_skip_ahead() -> None:
    km = keymat("aes256gcm16")
    out = OutboundSA(SPI, "aes256gcm16", km, sender_id=9, initial_seq=5000,
                     initial_iv_counter=123_456)
    esp = out.protect(ipv4())
    assert struct.unpack_from("!IIQ", esp) == (SPI, 5000, (9 << 48) | 123_456)
    assert out.next_seq == 5001 and out.next_iv_counter == 123_457
    inb = InboundSA(SPI, "aes256gcm16", km)
    assert inb.unprotect(esp) == ipv4()


# --- Tampering, truncation, replay ---------------------------------------------

@pytest.mark.parametrize("transform", ALL)
@pytest.mark.parametrize("esn", [False, True])
def test_every_altered_byte_fails(transform: str, esn: bool) -> None:
    # SPI bytes: the packet is not for this SA -> MalformedMessage (before any
    # crypto; a dispatcher would not have routed it here).  Sequence bytes: the
    # new number may be 0 or already seen -> ReplayError, else the ICV, which
    # covers it (RFC 4303 §3.3.2 / RFC 4106 §5), fails.  Anything else:
    # IntegrityError.
    out, inb = pair(transform, esn)
    esp = out.protect(ipv4(30))
    for i in range(len(esp)):
        for bit in (0x01, 0x80):
            forged = bytearray(esp)
            forged[i] ^= bit
            expected: tuple[type[Exception], ...]
            if i < 4:
                expected = (MalformedMessage,)
            elif i < 8:
                expected = (IntegrityError, ReplayError)
            else:
                expected = (IntegrityError,)
            with pytest.raises(expected):
                inb.unprotect(bytes(forged))
    assert inb.window.highest == 0        # nothing forged was recorded
    assert inb.unprotect(esp) == ipv4(30)


@pytest.mark.parametrize("transform", ALL)
def test_every_truncation_is_malformed_or_integrity(transform: str) -> None:
    for esn in (False, True):
        out, inb = pair(transform, esn)
        for inner in (ipv4(0), ipv6(33)):
            esp = out.protect(inner)
            for cut in range(len(esp)):
                with pytest.raises((MalformedMessage, IntegrityError)):
                    inb.unprotect(esp[:cut])
            assert inb.unprotect(esp) == inner


@pytest.mark.parametrize("transform", ALL)
def test_replay_and_left_of_window_refused(transform: str) -> None:
    km = keymat(transform)
    out = OutboundSA(SPI, transform, km, sender_id=1)
    inb = InboundSA(SPI, transform, km, replay_window=32)
    packets = [out.protect(ipv4()) for _ in range(100)]
    assert inb.unprotect(packets[0]) == ipv4()
    with pytest.raises(ReplayError):
        inb.unprotect(packets[0])
    inb.unprotect(packets[99])               # seq 100: window is now 69..100
    assert inb.unprotect(packets[68]) == ipv4()    # seq 69, inside, out of order
    with pytest.raises(ReplayError):
        inb.unprotect(packets[67])               # seq 68: left of the window
    with pytest.raises(ReplayError):
        inb.unprotect(packets[99])


def forge_authentic(transform: str, km: bytes, plain: bytes, seq: int = 1,
                    spi: int = SPI) -> bytes:
    """An ESP packet whose ICV is right but whose decrypted payload is ``plain``.

    AES-CBC encrypts whole blocks only: a ``plain`` of another length gets
    filler bytes after its first byte (the IP version nibble) and before its
    last two (Pad Length, Next Header); a two-byte ``plain`` gets zeros before.
    """
    t = TRANSFORMS[transform]
    key = km[:t.key_size]
    salt = km[t.key_size:t.key_size + t.salt_size]
    integ = km[t.key_size + t.salt_size:]
    spi_seq = struct.pack("!II", spi, seq)
    iv = struct.pack("!Q", 42)
    if t.cipher == "gcm":
        return spi_seq + iv + AESGCM(key).encrypt(salt + iv, plain, spi_seq)
    if t.cipher == "chacha20poly1305":
        return spi_seq + iv + ChaCha20Poly1305(key).encrypt(salt + iv, plain, spi_seq)
    assert t.integ is not None
    if t.cipher == "ctr":
        return CtrHmac(key, salt, integ, t.integ).seal(spi_seq, 42, plain, None)
    fill = -len(plain) % 16
    if len(plain) > 2:
        plain = plain[:1] + bytes(fill) + plain[1:]
    else:
        plain = bytes(fill) + plain
    return CbcHmac(key, integ, t.integ).seal(spi_seq, 42, plain, None)


@pytest.mark.parametrize("transform", ALL)
@pytest.mark.parametrize("plain", [
    ipv4(2) + b"\x01\x03\x02\x04",          # padding not 1, 2
    ipv4(2) + b"\x02\x04",                  # pad length 2 but no padding bytes...
    ipv4(0) + b"\x01\x02\x02\x29",          # next header 41 for an IPv4 packet
    ipv6(0) + b"\x01\x02\x02\x04",          # next header 4 for an IPv6 packet
    ipv4(0) + b"\x01\x02\x02\x3b",          # next header 59 (dummy) is not served
    b"\x50" + bytes(19) + b"\x00\x04",      # IP version 5
    b"\x01\x02",                            # pad length beyond the payload
    b"\x00\x04",                            # empty inner packet
])
def test_authentic_but_bad_trailer_is_malformed(transform: str, plain: bytes) -> None:
    km = keymat(transform)
    inb = InboundSA(SPI, transform, km)
    with pytest.raises(MalformedMessage):
        inb.unprotect(forge_authentic(transform, km, plain))
    # The ICV was right, so the sequence number is used (strongSwan records
    # after authentication, before the padding check).
    assert inb.window.highest == 1


@pytest.mark.parametrize("transform", ALL)
def test_long_padding_accepted(transform: str) -> None:
    # RFC 4303 §2.4: a sender may pad up to 255 bytes (e.g. to hide lengths).
    km = keymat(transform)
    inb = InboundSA(SPI, transform, km)
    inner = ipv4(0)
    pad = 250 if TRANSFORMS[transform].cipher == "cbc" else 254   # CBC: whole blocks
    plain = inner + bytes(range(1, pad + 1)) + bytes([pad, 4])
    assert inb.unprotect(forge_authentic(transform, km, plain)) == inner


# --- Sequence limits and events --------------------------------------------

@pytest.mark.parametrize("transform", ALL)
def test_sequence_exhaustion_and_rekey_event_32bit(transform: str) -> None:
    out, _ = pair(transform, initial_seq=0xFFFF_FFFF - 9, rekey_margin=5)
    seen = []
    for _ in range(10):
        esp = out.protect(ipv4())
        seen.append(struct.unpack_from("!I", esp, 4)[0])
        if out.next_seq - 1 < 0xFFFF_FFFF - 5:
            assert not out.rekey_requested
    assert seen[-1] == 0xFFFF_FFFF
    assert out.rekey_requested
    assert out.events == [RekeyRequested(SPI, 0xFFFF_FFFF - 5, 6)]
    with pytest.raises(SequenceExhausted):
        out.protect(ipv4())
    with pytest.raises(SequenceExhausted):
        out.protect(ipv4())       # stays exhausted; never wraps to 0
    assert out.next_seq == 0x1_0000_0000
    assert len(out.events) == 1


def test_sequence_exhaustion_64bit_esn() -> None:
    out = OutboundSA(SPI, "aes128gcm16", keymat("aes128gcm16"), sender_id=1, esn=True,
                     initial_seq=(1 << 64) - 2, initial_iv_counter=0, rekey_margin=0)
    out.protect(ipv4())
    out.protect(ipv4())
    assert out.events == [RekeyRequested(SPI, (1 << 64) - 1, 1)]
    with pytest.raises(SequenceExhausted):
        out.protect(ipv4())


def test_iv_space_limits_the_sa() -> None:
    # With ESN the 48-bit IV counter can end before the 64-bit sequence space.
    out = OutboundSA(SPI, "aes128gcm16", keymat("aes128gcm16"), sender_id=1, esn=True,
                     initial_iv_counter=(1 << 48) - 2)
    assert out.last_seq == 2
    out.protect(ipv4())
    out.protect(ipv4())
    with pytest.raises(SequenceExhausted):
        out.protect(ipv4())


def test_default_rekey_margin_fires_before_the_end() -> None:
    out = OutboundSA(SPI, "aes128gcm16", keymat("aes128gcm16"), sender_id=1,
                     initial_seq=0xFFFF_FFFF - (1 << 26) - 1)
    out.protect(ipv4())
    assert not out.rekey_requested
    out.protect(ipv4())
    assert out.rekey_requested and out.events[0].remaining == (1 << 26) + 1


@pytest.mark.parametrize("transform", ALL)
def test_esn_across_the_2_32_boundary(transform: str) -> None:
    km = keymat(transform)
    start = 0xFFFF_FFFF - 20
    out = OutboundSA(SPI, transform, km, sender_id=3, esn=True, initial_seq=start)
    inb = InboundSA(SPI, transform, km, replay_window=64, esn=True)
    packets = [out.protect(ipv4()) for _ in range(60)]
    lows = [struct.unpack_from("!I", p, 4)[0] for p in packets]
    assert lows[20] == 0xFFFF_FFFF and lows[21] == 0        # only 32 bits sent
    order = list(range(0, 60, 2)) + list(range(1, 60, 2))   # out of order across the wrap
    for i in order:
        assert inb.unprotect(packets[i]) == ipv4()
    assert inb.window.highest == start + 59
    with pytest.raises(ReplayError):
        inb.unprotect(packets[25])
    # Without the high half in the ICV a receiver that guesses wrong must fail:
    wrong = InboundSA(SPI, transform, km, esn=True)
    with pytest.raises(IntegrityError):
        wrong.unprotect(packets[30])          # guesses high half 0, sender used 1


def test_esn_off_and_on_are_not_interoperable() -> None:
    km = keymat("aes128gcm16")
    esp = OutboundSA(SPI, "aes128gcm16", km, sender_id=1, esn=True,
                     initial_seq=(1 << 32) + 5).protect(ipv4())
    with pytest.raises(IntegrityError):
        InboundSA(SPI, "aes128gcm16", km, esn=False).unprotect(esp)


# --- Inputs and errors -------------------------------------------------------------

def test_errors_are_the_common_ones() -> None:
    assert IntegrityError is errors.IntegrityError
    assert ReplayError is errors.ReplayError
    assert MalformedMessage is errors.MalformedMessage


@pytest.mark.parametrize("inner", [b"", b"\x50" + bytes(30), b"\x00"])
def test_protect_refuses_non_ip(inner: bytes) -> None:
    out, _ = pair("aes128gcm16")
    with pytest.raises(MalformedMessage):
        out.protect(inner)
    assert out.next_seq == 1           # no sequence number was spent


@pytest.mark.parametrize(("transform", "size", "message"), [
    ("aes128ctr-sha256", 20, "aes128ctr-sha256 needs keymat of 52 bytes "
     "(16 key + 4 nonce + 32 integrity), got 20"),
    ("aes256ctr-sha256", 52, "needs keymat of 68 bytes (32 key + 4 nonce + 32 integrity)"),
    ("aes128gcm16", 16, "aes128gcm16 needs keymat of 20 bytes (16 key + 4 salt), got 16"),
    ("aes256gcm16", 20, "needs keymat of 36 bytes (32 key + 4 salt), got 20"),
])
def test_wrong_keymat_length(transform: str, size: int, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        OutboundSA(SPI, transform, bytes(size), sender_id=1)
    with pytest.raises(ValueError, match="needs keymat"):
        InboundSA(SPI, transform, bytes(size))


def test_unknown_transform() -> None:
    with pytest.raises(ValueError, match="unknown ESP transform 'aes128cbc'; expected one of"):
        OutboundSA(SPI, "aes128cbc", bytes(20), sender_id=1)


@pytest.mark.parametrize("spi", [0, 1, 255, 1 << 32, -1, True])
def test_bad_spi(spi: int) -> None:
    with pytest.raises(ValueError, match="spi must be"):
        OutboundSA(spi, "aes128gcm16", bytes(20), sender_id=1)
    with pytest.raises(ValueError, match="spi must be"):
        InboundSA(spi, "aes128gcm16", bytes(20))


@pytest.mark.parametrize("sender_id", [-1, 1 << 16])
def test_bad_sender_id(sender_id: int) -> None:
    with pytest.raises(ValueError, match="sender_id"):
        OutboundSA(SPI, "aes128gcm16", bytes(20), sender_id=sender_id)


@pytest.mark.parametrize("window", [0, 31, 65537])
def test_bad_replay_window(window: int) -> None:
    with pytest.raises(ValueError, match="replay window size"):
        InboundSA(SPI, "aes128gcm16", bytes(20), replay_window=window)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"initial_seq": 0}, "initial_seq"),
    ({"initial_seq": 1 << 32}, "initial_seq"),
    ({"initial_seq": 1 << 50, "esn": True}, "pass initial_iv_counter"),
    ({"rekey_margin": -1}, "rekey_margin"),
    ({"initial_iv_counter": 1 << 48}, "48 bits"),
])
def test_bad_outbound_arguments(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        OutboundSA(SPI, "aes128gcm16", bytes(20), sender_id=1, **kwargs)


def test_wrong_spi_is_malformed() -> None:
    out, _ = pair("aes128gcm16")
    other = InboundSA(SPI + 1, "aes128gcm16", keymat("aes128gcm16"))
    with pytest.raises(MalformedMessage, match="reached SA"):
        other.unprotect(out.protect(ipv4()))


def test_window_export_import_between_members() -> None:
    km = keymat("aes128gcm16")
    out = OutboundSA(SPI, "aes128gcm16", km, sender_id=1)
    packets = [out.protect(ipv4()) for _ in range(10)]
    a = InboundSA(SPI, "aes128gcm16", km)
    for p in packets[:5]:
        a.unprotect(p)
    b = InboundSA(SPI, "aes128gcm16", km)       # the backup member
    b.import_window(a.export_window())
    with pytest.raises(ReplayError):
        b.unprotect(packets[2])
    assert b.unprotect(packets[7]) == ipv4()


def test_memoryview_and_bytearray_input() -> None:
    out, inb = pair("aes128ctr-sha256")
    esp = out.protect(bytearray(ipv4()))
    assert inb.unprotect(bytearray(esp)) == ipv4()


def test_refusals_name_the_spis_in_hex() -> None:
    """The compiled path formatted its SPIs with a conversion CPython 3.11
    does not know, and printed a literal ``%08lx`` instead."""
    out, inb = pair("aes128gcm16")
    other = InboundSA(SPI + 1, "aes128gcm16", keymat("aes128gcm16"))
    with pytest.raises(MalformedMessage) as wrong:
        other.unprotect(out.protect(ipv4()))
    assert "%" not in str(wrong.value)
    assert f"{SPI:08x}" in str(wrong.value) and f"{SPI + 1:08x}" in str(wrong.value)
    bad = bytearray(out.protect(ipv4()))
    bad[-1] ^= 1
    with pytest.raises(IntegrityError) as forged:
        inb.unprotect(bytes(bad))
    assert "%" not in str(forged.value) and f"{SPI:08x}" in str(forged.value)
