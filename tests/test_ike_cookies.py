"""Stateless cookies (RFC 7296 §2.6)."""

from __future__ import annotations

import pytest

from common.ike.cookies import COOKIE_LEN, CookieJar
from common.rand import deterministic_random

NI = b"n" * 32
IP4 = bytes([192, 0, 2, 7])
IP6 = bytes(15) + b"\x01"
SPI = b"\x01\x02\x03\x04\x05\x06\x07\x08"


def test_make_and_check() -> None:
    jar = CookieJar(deterministic_random(1))
    cookie = jar.make(NI, IP4, SPI)
    assert len(cookie) == COOKIE_LEN <= 64  # RFC 7296 §3.10.1: 1-64 octets
    assert cookie[0] == jar.version == 0
    assert jar.check(cookie, NI, IP4, SPI)
    assert jar.make(NI, IP4, SPI) == cookie  # stateless: the same request, the same cookie


@pytest.mark.parametrize(
    ("ni", "ip", "spi"),
    [
        (b"m" * 32, IP4, SPI),
        (NI, bytes([192, 0, 2, 8]), SPI),
        (NI, IP4, b"\x00" * 8),
        (NI, IP6, SPI),
    ],
)
def test_other_request_fails(ni: bytes, ip: bytes, spi: bytes) -> None:
    jar = CookieJar(deterministic_random(1))
    assert not jar.check(jar.make(NI, IP4, SPI), ni, ip, spi)


def test_no_resplitting_between_nonce_and_address() -> None:
    # Without length prefixes, Ni = NI | X with an IPv4 address would hash the
    # same octets as Ni = NI with the IPv6 address X | IPv4.
    jar = CookieJar(deterministic_random(1))
    x = b"\x20\x01\x0d\xb8" + bytes(8)
    cookie = jar.make(NI + x, IP4, SPI)
    assert jar.check(cookie, NI + x, IP4, SPI)
    assert not jar.check(cookie, NI, x + IP4, SPI)


def test_every_altered_cookie_fails() -> None:
    jar = CookieJar(deterministic_random(2))
    cookie = jar.make(NI, IP4, SPI)
    for i in range(len(cookie)):
        altered = bytearray(cookie)
        altered[i] ^= 0x01
        assert not jar.check(bytes(altered), NI, IP4, SPI)
    for n in range(len(cookie)):
        assert not jar.check(cookie[:n], NI, IP4, SPI)
    assert not jar.check(cookie + b"\x00", NI, IP4, SPI)


def test_rotation_keeps_previous_secret_only() -> None:
    jar = CookieJar(deterministic_random(3))
    old = jar.make(NI, IP4, SPI)
    jar.rotate()
    assert jar.version == 1
    new = jar.make(NI, IP4, SPI)
    assert new != old and new[0] == 1
    assert jar.check(old, NI, IP4, SPI) and jar.check(new, NI, IP4, SPI)
    jar.rotate()
    assert not jar.check(old, NI, IP4, SPI)
    assert jar.check(new, NI, IP4, SPI)


def test_version_wraps_and_old_version_id_does_not_resurrect() -> None:
    jar = CookieJar(deterministic_random(4))
    first = jar.make(NI, IP4, SPI)
    for _ in range(256):
        jar.rotate()
    assert jar.version == 0
    assert not jar.check(first, NI, IP4, SPI)  # same version octet, new secret


def test_cluster_members_with_same_randomness_agree() -> None:
    a, b = CookieJar(deterministic_random(5)), CookieJar(deterministic_random(5))
    assert b.check(a.make(NI, IP4, SPI), NI, IP4, SPI)


def test_secret_not_in_repr() -> None:
    secret_source = deterministic_random(6)
    jar = CookieJar(secret_source)
    assert repr(jar) == "CookieJar(version=0)"
