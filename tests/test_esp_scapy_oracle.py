"""An independent oracle: scapy's ESP (``scapy.layers.ipsec``) and ours agree.

scapy takes the GCM / ChaCha20-Poly1305 salt and the CTR nonce as the tail of
``crypt_key`` (RFC 4106 §8.1, RFC 7634 §4, RFC 3686 §5.1 order), so the key
material is split exactly as IKEv2 hands it out: encryption key (+ 4 bytes,
none for AES-CBC, RFC 3602), then the integrity key.  Every transform of
common.esp.transforms is here: AES-GCM, ChaCha20-Poly1305 (RFC 7634), AES-CTR and AES-CBC
(RFC 3602) with HMAC-SHA1-96 (RFC 2404) and HMAC-SHA-256/384/512 (RFC 4868).

Every case runs against the compiled byte primitive (``common.esp._esp_fast``, the
path SAs use by default when it is built; tests/test_esp_fast.py checks that
it is the default) and against the pure-Python reference.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.ipsec import ESP, SecurityAssociation
from scapy.packet import Packet

from common.esp.replay import ReplayState
from common.esp.transforms import TRANSFORMS, InboundSA, OutboundSA
from tests.esp_impls import IMPLS, use_impl

SPI = 0x0C01_2345


@pytest.fixture(autouse=True, params=IMPLS)
def esp_impl(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test here runs against the compiled and the pure-Python ESP path."""
    use_impl(request.param, monkeypatch)
    return str(request.param)
SCAPY_CIPHERS = {"gcm": "AES-GCM", "chacha20poly1305": "CHACHA20-POLY1305",
                 "ctr": "AES-CTR", "cbc": "AES-CBC"}
SCAPY_AUTHS = {None: None, "sha1": "HMAC-SHA1-96", "sha256": "SHA2-256-128",
               "sha384": "SHA2-384-192", "sha512": "SHA2-512-256"}
OUTER = IP(src="192.0.2.1", dst="198.51.100.1")


def scapy_sa(transform: str, km: bytes, esn: bool, seq_high: int) -> SecurityAssociation:
    t = TRANSFORMS[transform]
    crypt_algo, auth_algo = SCAPY_CIPHERS[t.cipher], SCAPY_AUTHS[t.integ]
    kwargs: dict[str, object] = {
        "crypt_algo": crypt_algo,
        "crypt_key": km[:t.key_size + t.salt_size],
        "tunnel_header": OUTER.copy(),
        "esn_en": esn,
        "esn": seq_high,
    }
    if auth_algo:
        kwargs.update(auth_algo=auth_algo, auth_key=km[t.key_size + t.salt_size:])
    return SecurityAssociation(ESP, spi=SPI, **kwargs)


def inner_v4(n: int) -> Packet:
    return IP(src="10.1.0.1", dst="10.2.0.1") / UDP(sport=1234, dport=5678) / os.urandom(n)


def inner_v6(n: int) -> Packet:
    return IPv6(src="2001:db8:1::1", dst="2001:db8:2::1") / UDP(sport=1, dport=2) / os.urandom(n)


CASES = [(t, esn, make) for t in sorted(TRANSFORMS) for esn in (False, True)
         for make in (inner_v4, inner_v6)]


@pytest.mark.parametrize(("transform", "esn", "make"), CASES)
def test_scapy_decrypts_what_we_protect(transform: str, esn: bool,
                                        make: Callable[[int], Packet]) -> None:
    km = os.urandom(TRANSFORMS[transform].keymat_size)
    seq_high = 3 if esn else 0
    out = OutboundSA(SPI, transform, km, sender_id=0x0101, esn=esn,
                     initial_seq=(seq_high << 32) + 7)
    sa = scapy_sa(transform, km, esn, seq_high)
    for n in (0, 1, 2, 3, 50, 200, 1300):
        inner = bytes(make(n))
        esp = out.protect(inner)
        outer = IP(bytes(OUTER.copy() / ESP(esp)))   # ESP bytes behind an outer header
        assert outer.proto == 50
        assert bytes(sa.decrypt(outer)) == inner


@pytest.mark.parametrize(("transform", "esn", "make"), CASES)
def test_we_unprotect_what_scapy_encrypts(transform: str, esn: bool,
                                          make: Callable[[int], Packet]) -> None:
    km = os.urandom(TRANSFORMS[transform].keymat_size)
    seq_high = 3 if esn else 0
    sa = scapy_sa(transform, km, esn, seq_high)
    inb = InboundSA(SPI, transform, km, esn=esn)
    if esn:
        # The window's top tells the receiver which 2^32 subspace is current.
        inb.import_window(ReplayState(1024, seq_high << 32 | 1, 1))
    for seq, n in enumerate((0, 1, 2, 3, 50, 200, 1300), start=2):
        inner = make(n)
        encrypted = sa.encrypt(inner, seq_num=seq)
        esp = bytes(encrypted[ESP])
        assert inb.unprotect(esp) == bytes(inner)
    assert inb.window.highest == (seq_high << 32) + 8
